//! Keys and values of past positions, per layer, so decoding one token costs one position.

use crate::ModelConfig;

pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    capacity: usize,
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

    /// Keeps the first `len` positions and forgets the rest: a shared prefix stays cached
    /// while different continuations of it run.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Keys and values of `layer`, for the block that appends to them.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.k[layer], &mut self.v[layer])
    }

    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
