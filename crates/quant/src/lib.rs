//! Quantization: the grid quantizer shared by every method, the calibration pipeline that
//! streams a model one decoder block at a time, and one module per method behind
//! [`method::Method`].

pub mod awq;
pub mod calib;
pub mod error;
pub mod gptq;
pub mod grid;
pub mod lowrank;
pub mod method;
pub mod pipeline;
pub mod residual;
pub mod rtn;
