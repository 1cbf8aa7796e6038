//! Evaluation protocols, each printing exactly what it measured.

pub mod ppl;
pub mod speed;
pub mod zeroshot;
