//! Evaluation protocols, each printing exactly what it measured.

pub mod kld;
pub mod ppl;
pub mod speed;
pub mod zeroshot;
