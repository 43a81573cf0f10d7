//! Percentiles of measured samples, and of a Prometheus histogram's increase.

use serde_json::{Value, json};

/// Latency samples in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn new(values: Vec<f64>) -> Samples {
        let mut values = values;
        values.sort_by(f64::total_cmp);
        Samples(values)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `q` quantile (nearest rank), or NaN without samples.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.0.len() as f64 * q).ceil() as usize).clamp(1, self.0.len());
        self.0[rank - 1]
    }

    pub fn p50(&self) -> f64 {
        self.quantile(0.5)
    }

    pub fn p99(&self) -> f64 {
        self.quantile(0.99)
    }

    pub fn max(&self) -> f64 {
        self.0.last().copied().unwrap_or(f64::NAN)
    }

    pub fn json(&self) -> Value {
        json!({
            "n": self.len(),
            "p50_ms": round(self.p50()),
            "p90_ms": round(self.quantile(0.9)),
            "p99_ms": round(self.p99()),
            "max_ms": round(self.max()),
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  (n={})",
            self.p50(),
            self.p99(),
            self.max(),
            self.len()
        )
    }
}

pub fn round(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 10.0).round() / 10.0)
    } else {
        Value::Null
    }
}

/// The cumulative buckets (`le` in seconds → count) of histogram `name` with `labels` in a
/// Prometheus text exposition, summed over the series that match.
pub fn buckets(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let mut found: Vec<(f64, f64)> = Vec::new();
    let prefix = format!("{name}_bucket{{");
    for line in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if !labels
            .iter()
            .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        let Some(le) = series
            .split("le=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let count: f64 = value.parse().unwrap_or(0.0);
        match found.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += count,
            None => found.push((le, count)),
        }
    }
    found.sort_by(|a, b| a.0.total_cmp(&b.0));
    found
}

/// The `q` quantile, in milliseconds, of what histogram buckets gained between `before` and
/// `after` (linear within a bucket, as Prometheus' `histogram_quantile` does), and the number
/// of observations. NaN when nothing was observed.
pub fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> (f64, f64) {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, count)| {
            let was = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, count - was)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, c)| *c);
    if total <= 0.0 {
        return (f64::NAN, 0.0);
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in &delta {
        if count >= rank {
            if le.is_infinite() {
                return (lower.0 * 1000.0, total);
            }
            let within = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                1.0
            };
            return ((lower.0 + (le - lower.0) * within) * 1000.0, total);
        }
        lower = (le, count);
    }
    (f64::NAN, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let s = Samples::new((1..=100).map(f64::from).collect());
        assert_eq!(s.p50(), 50.0);
        assert_eq!(s.p99(), 99.0);
        assert_eq!(s.max(), 100.0);
        assert!(Samples::default().p50().is_nan());
    }

    #[test]
    fn histogram_quantiles_interpolate_within_the_bucket_of_the_increase() {
        let text = "x_bucket{source=\"a\",le=\"0.001\"} 10\nx_bucket{source=\"a\",le=\"0.002\"} 10\n\
                    x_bucket{source=\"a\",le=\"0.005\"} 110\nx_bucket{source=\"a\",le=\"+Inf\"} 110\n\
                    x_bucket{source=\"b\",le=\"0.001\"} 5\n";
        let before = [
            (0.001, 10.0),
            (0.002, 10.0),
            (0.005, 10.0),
            (f64::INFINITY, 10.0),
        ];
        let after = buckets(text, "x", &[("source", "a")]);
        assert_eq!(after.len(), 4);
        let (p50, n) = histogram_quantile(&before, &after, 0.5);
        assert_eq!(n, 100.0);
        assert!((p50 - 3.5).abs() < 1e-9, "{p50}");
    }
}
