//! Outputs appear whole or not at all: everything is written under a temporary name next to
//! the destination and renamed into place once complete.

use anyhow::{Context, Result};
use std::fs;
use std::path::Path;

/// Writes a directory atomically: `fill` populates a fresh temporary directory beside `dest`,
/// which then replaces `dest` (an existing `dest` is replaced only after `fill` succeeded,
/// and only if it is empty or a model directory with a `config.json`).
pub fn write_dir(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_replaceable(dest)?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.partial-"))
        .tempdir_in(parent)
        .with_context(|| {
            format!(
                "cannot create a temporary directory in {}",
                parent.display()
            )
        })?;
    fill(tmp.path())?;
    if dest.exists() {
        fs::remove_dir_all(dest).with_context(|| format!("cannot replace {}", dest.display()))?;
    }
    let tmp_path = tmp.keep();
    fs::rename(&tmp_path, dest)
        .with_context(|| format!("cannot rename into {}", dest.display()))?;
    Ok(())
}

/// Writes a file atomically: `fill` writes a temporary file beside `dest`, which is synced
/// and then renamed onto `dest`; an error or interruption leaves `dest` as it was.
pub fn write_file(
    dest: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&fs::File>) -> Result<()>,
) -> Result<()> {
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(parent)
        .with_context(|| format!("cannot create a temporary file in {}", parent.display()))?;
    {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
        fill(&mut out).with_context(|| format!("cannot write {}", dest.display()))?;
        std::io::Write::flush(&mut out)
            .with_context(|| format!("cannot write {}", dest.display()))?;
    }
    tmp.as_file().sync_all()?;
    // Temporary files are created private; the result is an ordinary file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(dest)
        .with_context(|| format!("cannot rename into {}", dest.display()))?;
    Ok(())
}

/// Refuses an output path that [`write_dir`] must not replace: anything but a missing path,
/// an empty directory or an earlier model directory (one with a `config.json`), so that a
/// mistyped destination never deletes unrelated files. Callers with long jobs check first.
pub fn check_replaceable(dest: &Path) -> Result<()> {
    if !dest.exists() {
        return Ok(());
    }
    let empty = fs::read_dir(dest).map(|mut d| d.next().is_none());
    if dest.join("config.json").is_file() || matches!(empty, Ok(true)) {
        return Ok(());
    }
    anyhow::bail!(
        "{} exists and is not a model directory; choose another output path",
        dest.display()
    )
}
