//! The Prometheus text format, parsed into samples with their labels: sums over label subsets and quantiles of
//! histograms, for the operator's and the API server's `/metrics` (the benchmark reads both). The simpler
//! [`crate::worker_process::metric_sum`] and [`crate::worker_process::metric_value`] suffice for one series.

/// One line of the exposition: `name{label="value",...} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Every sample of `text`; comments, blank lines and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter(|line| !line.is_empty() && !line.starts_with('#')).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remainder) = parse_labels(after)?;
        labels = parsed;
        rest = remainder;
    }
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample { name: name.to_owned(), labels, value })
}

/// `key="value",...}` (escapes `\\`, `\"`, `\n`), returning the labels and what follows the `}`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        s = &s[end + 1..];
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// The sum of every sample named `name` whose labels include `labels` (0 when there is none).
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

/// The `q` quantile of histogram `name` (its `_bucket` series, linear within a bucket as PromQL's
/// `histogram_quantile` does); `None` when it has no observations.
pub fn histogram_quantile(samples: &[Sample], name: &str, q: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == bucket)
        .filter_map(|s| Some((parse_value(s.label("le")?)?, s.value)))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let &(last_le, total) = buckets.last()?;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut prev_le, mut prev_count) = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le == f64::INFINITY {
                return Some(prev_le);
            }
            return Some(prev_le + (le - prev_le) * ((rank - prev_count) / (count - prev_count).max(1e-9)));
        }
        (prev_le, prev_count) = (le, count);
    }
    Some(last_le)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP warren_operator_reconciles_total Reconciles.
# TYPE warren_operator_reconciles_total counter
warren_operator_reconciles_total{result="ok"} 10
warren_operator_reconciles_total{result="error"} 2
apiserver_request_total{code="201",resource="rpcservices",verb="POST",path="a\"b,c"} 1e3
d_bucket{le="0.1"} 5
d_bucket{le="1"} 10
d_bucket{le="+Inf"} 10
d_sum 3.5
d_count 10
plain 4 1700000000000
"#;

    #[test]
    fn parses_labels_escapes_and_timestamps() {
        let samples = parse(TEXT);
        assert_eq!(samples.len(), 9);
        assert_eq!(sum(&samples, "warren_operator_reconciles_total", &[]), 12.0);
        assert_eq!(sum(&samples, "warren_operator_reconciles_total", &[("result", "error")]), 2.0);
        let request = samples.iter().find(|s| s.name == "apiserver_request_total").unwrap();
        assert_eq!(request.label("path"), Some("a\"b,c"));
        assert_eq!(request.label("verb"), Some("POST"));
        assert_eq!(request.value, 1000.0);
        assert_eq!(sum(&samples, "plain", &[]), 4.0);
        assert_eq!(sum(&samples, "absent", &[]), 0.0);
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        let samples = parse(TEXT);
        assert!((histogram_quantile(&samples, "d", 0.5).unwrap() - 0.1).abs() < 1e-9);
        assert!((histogram_quantile(&samples, "d", 0.75).unwrap() - 0.55).abs() < 1e-9);
        assert_eq!(histogram_quantile(&samples, "absent", 0.5), None);
    }
}
