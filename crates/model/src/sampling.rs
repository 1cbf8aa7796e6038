//! Choosing the next token: greedy at temperature 0, otherwise temperature-scaled nucleus
//! (top-p) sampling from a seeded generator, so a run is reproducible.

use rand::{RngExt, SeedableRng};

pub struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        Self {
            temperature,
            top_p,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / self.temperature).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        // The smallest prefix whose mass reaches top_p (at least one token).
        let mut mass = 0.0;
        let mut keep = 0;
        for p in &probs {
            mass += p.1;
            keep += 1;
            if mass >= self.top_p {
                break;
            }
        }
        let mut r = self.rng.random_range(0.0..mass);
        for &(id, p) in &probs[..keep] {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs[keep - 1].0
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_nucleus() {
        let logits = [0.0f32, 5.0, 1.0, 4.9];
        assert_eq!(Sampler::new(0.0, 1.0, 0).sample(&logits), 1);
        // top_p small enough that only the best token is kept.
        let mut s = Sampler::new(1.0, 0.1, 42);
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // With the full distribution both likely tokens appear.
        let mut s = Sampler::new(1.0, 1.0, 42);
        let draws: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(draws.contains(&1) && draws.contains(&3));
    }
}
