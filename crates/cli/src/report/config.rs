//! The report's TOML configuration: one reference model, the measurements to run on every
//! cell, the cells (quantization settings) and the QDEC sweeps.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub title: String,
    /// The full-precision model every cell quantizes, measured as the reference row.
    pub model: String,
    #[serde(default)]
    pub calibration: Calibration,
    pub ppl: PplStep,
    pub kld: Option<KldStep>,
    pub eval: Option<EvalStep>,
    pub bench: Option<BenchStep>,
    #[serde(default, rename = "cell")]
    pub cells: Vec<Cell>,
    #[serde(default, rename = "qdec")]
    pub qdec: Vec<QdecSweep>,
}

/// Calibration of the methods that need it (RTN runs without).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Calibration {
    pub calib: String,
    pub nsamples: usize,
    pub seqlen: usize,
}

impl Calibration {
    /// The flags of `quantize` and `residual` that select this calibration.
    pub fn args(&self) -> Vec<String> {
        [
            "--calib".to_string(),
            self.calib.clone(),
            "--nsamples".into(),
            self.nsamples.to_string(),
            "--seqlen".into(),
            self.seqlen.to_string(),
        ]
        .into()
    }
}

impl Default for Calibration {
    fn default() -> Self {
        Self {
            calib: "wiki-calib".into(),
            nsamples: 32,
            seqlen: 512,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PplStep {
    pub text: String,
    pub ctx: usize,
    pub max_windows: Option<usize>,
    /// `gptq` (ppl's default) or `llamacpp`.
    pub protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KldStep {
    pub text: String,
    pub ctx: usize,
    pub max_windows: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalStep {
    pub tasks: Vec<String>,
    pub limit: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchStep {
    pub pp: usize,
    pub tg: usize,
    pub reps: usize,
}

/// One quantized model: `recoup quantize --method M --bits B [--group G] [--rank R] ARGS…`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cell {
    pub name: String,
    pub method: String,
    /// The line this cell belongs to in plots (default: the method).
    pub series: Option<String>,
    pub bits: u32,
    pub group: Option<String>,
    pub rank: Option<usize>,
    /// Further `quantize` flags, as on the command line.
    #[serde(default)]
    pub args: Vec<String>,
}

/// Perplexity of a cell with QDEC at each `k_chunk`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QdecSweep {
    pub cell: String,
    pub k: Vec<usize>,
    /// The selection ablation: at this `k_chunk`, exact top-k against the bucket
    /// approximation, a static channel set and random channels.
    pub selectors_at: Option<usize>,
}

/// The reference row's name in tables and result files.
pub const REFERENCE: &str = "reference";

impl Cell {
    pub fn series(&self) -> &str {
        self.series.as_deref().unwrap_or(&self.method)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid report config", path.display()))?;
        config
            .validate()
            .with_context(|| format!("report config {}", path.display()))?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let mut names = vec![REFERENCE];
        for cell in &self.cells {
            let ok = !cell.name.is_empty()
                && cell
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                bail!(
                    "cell name {:?}: use letters, digits, '-', '_' and '.' only (it names files)",
                    cell.name
                );
            }
            if names.contains(&cell.name.as_str()) {
                bail!("cell name {:?} is used twice (or is reserved)", cell.name);
            }
            names.push(&cell.name);
        }
        for sweep in &self.qdec {
            if !self.cells.iter().any(|c| c.name == sweep.cell) {
                bail!(
                    "qdec sweep names cell {:?}, which is not defined",
                    sweep.cell
                );
            }
            if sweep.k.is_empty() || sweep.k.contains(&0) || sweep.selectors_at == Some(0) {
                bail!(
                    "qdec sweep of {:?} needs k_chunk values above 0 (k 0 is the cell itself)",
                    sweep.cell
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    const BASE: &str = "title = \"t\"\nmodel = \"m\"\n[ppl]\ntext = \"x\"\nctx = 512\n";

    #[test]
    fn cells_and_sweeps_parse_with_defaults() {
        let c = parse(&format!(
            "{BASE}[[cell]]\nname = \"rtn-w3\"\nmethod = \"rtn\"\nbits = 3\nargs = [\"--head-bits\", \"8\"]\n[[qdec]]\ncell = \"rtn-w3\"\nk = [4, 8]\nselectors_at = 8\n"
        ))
        .unwrap();
        assert_eq!(c.cells[0].args, ["--head-bits", "8"]);
        assert_eq!(c.calibration.nsamples, 32);
        assert_eq!(c.qdec[0].k, [4, 8]);
        assert_eq!(c.qdec[0].selectors_at, Some(8));
        assert!(c.kld.is_none());
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        for (extra, want) in [
            (
                "[[cell]]\nname = \"a/b\"\nmethod = \"rtn\"\nbits = 3\n",
                "names files",
            ),
            (
                "[[cell]]\nname = \"a\"\nmethod = \"rtn\"\nbits = 3\n[[cell]]\nname = \"a\"\nmethod = \"rtn\"\nbits = 4\n",
                "used twice",
            ),
            ("[[qdec]]\ncell = \"nope\"\nk = [8]\n", "not defined"),
            (
                "[[cell]]\nname = \"a\"\nmethod = \"rtn\"\nbits = 3\n[[qdec]]\ncell = \"a\"\nk = [0, 8]\n",
                "above 0",
            ),
            ("colour = \"red\"\n", "unknown field"),
        ] {
            let err = format!("{:#}", parse(&format!("{BASE}{extra}")).unwrap_err());
            assert!(err.contains(want), "{extra}: {err}");
        }
    }
}
