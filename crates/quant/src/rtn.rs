//! Round-to-nearest: every group on its min-max grid, no calibration needed. The baseline
//! every other method must beat. With a clipping search, each group's range is shrunk where
//! that lowers its squared error, weighted by `diag H` when calibration data is given.

use crate::calib::BlockStats;
use crate::grid::{Clip, quantize_rtn};
use crate::method::{
    BlockWeights, GridChoice, LinearName, Method, QuantizedLinear, quantize_targets,
};
use anyhow::Result;
use recoup_formats::packed::PackedLinear;

pub struct Rtn {
    pub grid: GridChoice,
    pub clip: Clip,
}

impl Method for Rtn {
    fn name(&self) -> &'static str {
        "rtn"
    }

    fn settings(&self) -> serde_json::Value {
        let mut s = self.grid.settings();
        if let Clip::Search { min_ratio, steps } = self.clip {
            s["clip_min_ratio"] = min_ratio.into();
            s["clip_steps"] = steps.into();
        }
        s
    }

    fn needs_calibration(&self) -> bool {
        false
    }

    fn quantize_block(
        &self,
        block: &mut BlockWeights,
        stats: Option<&BlockStats>,
        targets: &[LinearName],
    ) -> Result<Vec<(LinearName, QuantizedLinear)>> {
        quantize_targets(block, targets, &self.grid, |name, l, spec| {
            let diag: Option<Vec<f32>> = stats.map(|st| {
                let st = st.site(name.site());
                (0..st.n).map(|i| st.h[i * st.n + i] as f32).collect()
            });
            let matrix = quantize_rtn(&l.w, l.rows, l.cols, spec, self.clip, diag.as_deref())
                .pack(*spec, l.rows, l.cols);
            Ok(QuantizedLinear::plain(PackedLinear::plain(matrix)))
        })
    }
}
