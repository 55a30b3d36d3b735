//! A preallocated log-linear latency histogram (HDR-style): recording is an index computation and
//! an increment, so the measured loop never allocates.

/// Sub-buckets per power of two, as a bit count: 2^5 = 32 sub-buckets bound the relative error of
/// a reported percentile to 1/32 ≈ 3%, finer than the run-to-run noise on the build machines.
const SUB_BITS: u32 = 5;
/// Number of sub-buckets per power of two.
const SUB: u64 = 1 << SUB_BITS;
/// Largest recordable value as a bit count: 2^40 ns ≈ 18 minutes, far beyond any sane I/O
/// latency; larger values are clamped into the last bucket.
const MAX_BITS: u32 = 40;
/// Number of buckets needed to cover `0..2^MAX_BITS` at `SUB` buckets per power of two.
const BUCKETS: usize = ((MAX_BITS - SUB_BITS + 1) as usize) * (SUB as usize);

/// Latency histogram in nanoseconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    max: u64,
}

/// Percentiles of one run, in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LatencySummary {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// Allocates all buckets up front.
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
            max: 0,
        }
    }

    /// Forgets every recorded value, keeping the allocation.
    pub fn reset(&mut self) {
        self.counts.fill(0);
        self.total = 0;
        self.max = 0;
    }

    fn index(value: u64) -> usize {
        let v = value.min((1 << MAX_BITS) - 1);
        if v < SUB {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        ((u64::from(shift) + 1) * SUB + ((v >> shift) - SUB)) as usize
    }

    /// Midpoint of bucket `idx` (exact for the unit-width buckets below `SUB`).
    fn value_at(idx: usize) -> u64 {
        let idx = idx as u64;
        if idx < SUB {
            return idx;
        }
        let shift = idx / SUB - 1;
        let low = (idx % SUB + SUB) << shift;
        low + ((1u64 << shift) >> 1)
    }

    /// Records one latency in nanoseconds.
    #[inline]
    pub fn record(&mut self, nanos: u64) {
        // The index is below BUCKETS by construction of `index` (value clamped to MAX_BITS).
        if let Some(c) = self.counts.get_mut(Self::index(nanos)) {
            *c += 1;
        }
        self.total += 1;
        self.max = self.max.max(nanos);
    }

    /// The value at quantile `q` (0..=1) in nanoseconds; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (idx, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value_at(idx).min(self.max);
            }
        }
        self.max
    }

    /// The cumulative distribution: one `[latency_us, fraction ≤ it]` point per non-empty
    /// bucket (bucket midpoints, the last capped at the maximum), for the CDF plots.
    pub fn cdf(&self) -> Vec<[f64; 2]> {
        let mut out = Vec::new();
        if self.total == 0 {
            return out;
        }
        let mut seen = 0u64;
        for (idx, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            seen += c;
            let v = Self::value_at(idx).min(self.max);
            out.push([v as f64 / 1000.0, seen as f64 / self.total as f64]);
        }
        out
    }

    /// p50/p90/p99/p99.9/max in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            p50_us: us(self.quantile(0.50)),
            p90_us: us(self.quantile(0.90)),
            p99_us: us(self.quantile(0.99)),
            p999_us: us(self.quantile(0.999)),
            max_us: us(self.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_monotonic_and_in_range() {
        let mut last = 0;
        for v in (0..100_000u64).chain([1 << 39, (1 << 40) - 1, 1 << 41, u64::MAX]) {
            let idx = Histogram::index(v);
            assert!(idx >= last, "index not monotonic at {v}");
            assert!(idx < BUCKETS);
            last = idx;
        }
    }

    #[test]
    fn bucket_value_is_within_three_percent() {
        for v in [
            1u64,
            31,
            32,
            33,
            100,
            1_000,
            4_321,
            99_999,
            1_234_567,
            987_654_321,
        ] {
            let got = Histogram::value_at(Histogram::index(v)) as f64;
            let err = (got - v as f64).abs() / v as f64;
            assert!(err <= 1.0 / 32.0, "{v} -> {got}");
        }
    }

    #[test]
    fn quantiles_of_uniform_values() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 / 5_000_000.0 - 1.0).abs() < 0.04, "{p50}");
        assert!((p99 / 9_900_000.0 - 1.0).abs() < 0.04, "{p99}");
        assert_eq!(h.quantile(1.0), 10_000_000);
        let cdf = h.cdf();
        assert!(cdf
            .windows(2)
            .all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1]));
        assert_eq!(cdf.last().map(|p| p[1]), Some(1.0));
        h.reset();
        assert_eq!(h.total, 0);
        assert!(h.cdf().is_empty());
        assert_eq!(h.quantile(0.5), 0);
    }
}
