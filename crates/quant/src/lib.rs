//! Quantization: the grid quantizer shared by every method, the calibration pipeline that
//! streams a model one decoder block at a time, and one module per method behind
//! [`method::Method`].

pub mod grid;
