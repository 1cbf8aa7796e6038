//! Keys and values of past positions, per layer, so decoding one token costs one position.

use crate::ModelConfig;

pub struct KvCache {
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
    kv_dim: usize,
}

impl KvCache {
    /// Room for `capacity` positions.
    pub fn new(config: &ModelConfig, capacity: usize) -> Self {
        let kv_dim = config.kv_dim();
        let layer = || vec![0f32; capacity * kv_dim];
        Self {
            k: (0..config.n_layers).map(|_| layer()).collect(),
            v: (0..config.n_layers).map(|_| layer()).collect(),
            len: 0,
            capacity,
            kv_dim,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Writes `t` new positions' keys and values of `layer` after the held ones.
    pub(crate) fn write(&mut self, layer: usize, k: &[f32], v: &[f32], t: usize) {
        let (at, n) = (self.len * self.kv_dim, t * self.kv_dim);
        self.k[layer][at..at + n].copy_from_slice(&k[..n]);
        self.v[layer][at..at + n].copy_from_slice(&v[..n]);
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
