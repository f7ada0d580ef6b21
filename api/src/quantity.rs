//! Byte quantities in Kubernetes' notation (`512Mi`, `8Gi`, `1G`, `1000`), and the bytes the
//! operator counts against `spec.eplb.maxBytesPerRemap`: the operator enforces the budget and
//! `moectl backtest` replays it, with these two functions.

/// Parses a non-negative byte quantity; `None` when it is not one (fractions of a byte,
/// negative values, unknown suffixes).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return None;
    }
    let multiplier: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        _ => return None,
    };
    let value: f64 = number.parse().ok()?;
    let bytes = value * multiplier;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return None;
    }
    Some(bytes.round() as u64)
}

/// Bytes of one expert's weights as a remap's byte budget counts them (gate, up and down
/// projections in bf16), from `spec.model.hidden` and `spec.model.intermediate`.
pub fn expert_bytes(hidden: u32, intermediate: u32) -> u64 {
    3 * u64::from(hidden) * u64::from(intermediate) * 2
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("8Gi"), Some(8 << 30));
        assert_eq!(parse_bytes("1.5Ki"), Some(1536));
        assert_eq!(parse_bytes("2G"), Some(2_000_000_000));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("-1"), None);
        assert_eq!(parse_bytes("1Zi"), None);
        assert_eq!(parse_bytes(""), None);
    }
}
