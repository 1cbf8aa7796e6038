//! Round-to-nearest: every group on its min-max grid, no calibration. The baseline every
//! other method must beat.

use crate::calib::BlockStats;
use crate::grid::{Clip, quantize_rtn};
use crate::method::{BlockWeights, GridChoice, LinearName, Method, QuantizedLinear};
use anyhow::Result;
use recoup_formats::packed::PackedLinear;

pub struct Rtn {
    pub grid: GridChoice,
}

impl Method for Rtn {
    fn name(&self) -> &'static str {
        "rtn"
    }

    fn settings(&self) -> serde_json::Value {
        self.grid.settings()
    }

    fn needs_calibration(&self) -> bool {
        false
    }

    fn quantize_block(
        &self,
        block: &mut BlockWeights,
        _stats: Option<&BlockStats>,
        targets: &[LinearName],
    ) -> Result<Vec<(LinearName, QuantizedLinear)>> {
        targets
            .iter()
            .map(|&name| {
                let l = block.linear(name);
                let spec = self.grid.spec(l.cols)?;
                let matrix = quantize_rtn(&l.w, l.rows, l.cols, &spec, Clip::None, None)
                    .pack(spec, l.rows, l.cols);
                let packed = PackedLinear { matrix, perm: None };
                Ok((name, QuantizedLinear::plain(packed)))
            })
            .collect()
    }
}
