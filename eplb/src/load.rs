//! Per-window logical expert loads.

use serde_json::Value;

mod scan;

use crate::error::{EplbError, Result};

/// Load history: `windows[w][layer][expert]` token counts, oldest window first.
///
/// Every window has the same number of layers and every layer the same number of experts;
/// every count is finite and non-negative. Counts may be fractional.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadHistory {
    windows: Vec<Vec<Vec<f64>>>,
}

fn lerr<T>(m: String) -> Result<T> {
    Err(EplbError::Load(m))
}

impl LoadHistory {
    /// Builds a history, validating shape and values.
    pub fn new(windows: Vec<Vec<Vec<f64>>>) -> Result<LoadHistory> {
        let Some(first) = windows.first() else {
            return lerr("the load has no windows".into());
        };
        let layers = first.len();
        if layers == 0 {
            return lerr("window 0 has no layers".into());
        }
        let experts = first[0].len();
        if experts == 0 {
            return lerr("window 0 layer 0 has no experts".into());
        }
        for (w, win) in windows.iter().enumerate() {
            if win.len() != layers {
                return lerr(format!(
                    "window {w} has {} layers, window 0 has {layers}",
                    win.len()
                ));
            }
            for (l, row) in win.iter().enumerate() {
                if row.len() != experts {
                    return lerr(format!(
                        "window {w} layer {l} has {} experts, expected {experts} (ragged array)",
                        row.len()
                    ));
                }
                check_counts(row)
                    .map_err(|m| EplbError::Load(format!("window {w} layer {l}{m}")))?;
            }
        }
        Ok(LoadHistory { windows })
    }

    /// A history of one window `[layer][expert]`.
    pub fn single(window: Vec<Vec<f64>>) -> Result<LoadHistory> {
        LoadHistory::new(vec![window])
    }

    pub fn num_windows(&self) -> usize {
        self.windows.len()
    }

    pub fn num_layers(&self) -> usize {
        self.windows[0].len()
    }

    pub fn num_experts(&self) -> usize {
        self.windows[0][0].len()
    }

    /// All windows, oldest first.
    pub fn windows(&self) -> &[Vec<Vec<f64>>] {
        &self.windows
    }

    /// The newest window `[layer][expert]`.
    pub fn last(&self) -> &[Vec<f64>] {
        &self.windows[self.windows.len() - 1]
    }

    /// The sum over windows `[layer][expert]`.
    pub fn total(&self) -> Vec<Vec<f64>> {
        let mut t = self.windows[0].clone();
        for w in &self.windows[1..] {
            for (a, b) in t.iter_mut().zip(w) {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
            }
        }
        t
    }

    /// One layer's rows, one per window, oldest first.
    pub fn layer(&self, layer: usize) -> Vec<&[f64]> {
        self.windows.iter().map(|w| w[layer].as_slice()).collect()
    }

    /// The windows `range` as a new history (for back-testing).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Result<LoadHistory> {
        let w = self
            .windows
            .get(range.clone())
            .ok_or_else(|| EplbError::Load(format!("window range {range:?} out of bounds")))?;
        LoadHistory::new(w.to_vec())
    }
}

/// A row's counts are finite and non-negative and their sum is finite; else the message
/// after "window W layer L" for the first count that is not, or for the sum.
///
/// The common case (every count fine, a sum far from overflowing) is decided with running
/// maxima over independent lanes, no branch per count: the sum of a history's 120,000 counts
/// in order, one dependent addition after another, took longer than reading them. The exact
/// checks (in order, for the message) run only when the maxima say that a count may be
/// negative or not finite, or that the sum may come near `f64::MAX`.
///
/// [`LoadHistory::new`] checks every row with it; the operator asks it first of the windows a
/// worker reports, to leave a bad one out rather than fail the whole history.
pub fn check_counts(row: &[f64]) -> std::result::Result<(), String> {
    const LANES: usize = 8;
    // `x > top` is false for NaN: NaN and negative counts are caught by the smallest count.
    let mut top = [0.0f64; LANES];
    let mut low = [0.0f64; LANES];
    let mut nan = [false; LANES];
    let (blocks, rest) = row.as_chunks::<LANES>();
    for block in blocks {
        for k in 0..LANES {
            let x = block[k];
            top[k] = if x > top[k] { x } else { top[k] };
            low[k] = if x < low[k] { x } else { low[k] };
            nan[k] |= x.is_nan();
        }
    }
    for &x in rest {
        top[0] = if x > top[0] { x } else { top[0] };
        low[0] = if x < low[0] { x } else { low[0] };
        nan[0] |= x.is_nan();
    }
    let largest = top.into_iter().fold(0.0, f64::max);
    let smallest = low.into_iter().fold(0.0, f64::min);
    // The rounded sum of counts up to `largest` is at most the row's length times it, times
    // (1 + length x epsilon): far below `f64::MAX` under this bound.
    let bound = f64::MAX / 2.0 / (row.len().max(1) as f64);
    if largest <= bound && smallest >= 0.0 && !nan.contains(&true) {
        return Ok(());
    }
    check_counts_in_order(row)
}

/// The exact checks, each count in order (naming the first bad one), then the sum in order:
/// what [`check_counts`] falls back to, and its reference in the tests.
fn check_counts_in_order(row: &[f64]) -> std::result::Result<(), String> {
    for (e, &x) in row.iter().enumerate() {
        if !x.is_finite() {
            return Err(format!(" expert {e}: count {x} is not a finite number"));
        }
        if x < 0.0 {
            return Err(format!(" expert {e}: count {x} is negative"));
        }
    }
    if !row.iter().sum::<f64>().is_finite() {
        return Err(": counts too large (their sum overflows)".into());
    }
    Ok(())
}

/// This project's load formats (`[L][E]`, `[W][L][E]`, `{"windows"}`, OpenEvolve's
/// `{"load_history"}`) read without a JSON value tree: integer counts by [`scan`], the rest
/// as plain serde types. The fast path of [`LoadHistory::from_json_str`] and
/// [`crate::formats::read_load_bytes`]. `None` when the text is not exactly one of them.
pub(crate) fn typed_windows(bytes: &[u8]) -> Option<(Vec<Vec<Vec<f64>>>, &'static str)> {
    // Integer counts, the common case, take the scanner (see `scan` for why). It accepts
    // ASCII only, so it needs no UTF-8 check; serde_json reading bytes does not check the
    // strings it skips (an extra field's value), so the rest is checked here first.
    if let Some(found) = scan::integer_windows(bytes) {
        return Some(found);
    }
    let text = std::str::from_utf8(bytes).ok()?;
    #[derive(serde::Deserialize)]
    struct Record {
        logical_expert_load: Vec<Vec<f64>>,
    }
    #[derive(serde::Deserialize)]
    struct Object {
        windows: Option<Vec<Vec<Vec<f64>>>>,
        load_history: Option<Vec<Record>>,
    }
    match text.trim_start().as_bytes().first()? {
        // A 3-D array fails the 2-D parse at its first inner bracket, so trying both costs
        // little.
        b'[' => match serde_json::from_str::<Vec<Vec<f64>>>(text) {
            Ok(m) => Some((vec![m], "[L][E] array")),
            Err(_) => serde_json::from_str::<Vec<Vec<Vec<f64>>>>(text)
                .ok()
                .map(|w| (w, "[W][L][E] array")),
        },
        b'{' => match serde_json::from_str::<Object>(text).ok()? {
            Object {
                windows: Some(w), ..
            } => Some((w, "moectl windows")),
            Object {
                windows: None,
                load_history: Some(h),
            } => Some((
                h.into_iter().map(|r| r.logical_expert_load).collect(),
                "OpenEvolve EPLB data set (load_history)",
            )),
            _ => None,
        },
        _ => None,
    }
}

pub(crate) fn matrix(v: &Value, what: &str) -> Result<Vec<Vec<f64>>> {
    let rows = v
        .as_array()
        .ok_or_else(|| EplbError::Load(format!("{what} must be an array of layers")))?;
    rows.iter()
        .enumerate()
        .map(|(l, row)| {
            let row = row.as_array().ok_or_else(|| {
                EplbError::Load(format!(
                    "{what} layer {l} must be an array of expert counts"
                ))
            })?;
            row.iter()
                .enumerate()
                .map(|(e, x)| {
                    x.as_f64().ok_or_else(|| {
                        EplbError::Load(format!("{what} layer {l} expert {e}: {x} is not a number"))
                    })
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed fast path and the general path read every format the same way.
    #[test]
    fn fast_path_agrees_with_the_general_path() {
        for text in [
            "[[1, 2.5], [3, 4]]",
            r#"{"windows": [[[1, 2]], [[3, 4.5]]]}"#,
            r#"{"load_history": [{"logical_expert_load": [[1, 2]]}, {"logical_expert_load": [[0, 7]]}]}"#,
            r#"{"windows": [[[1, 2]]], "load_history": [{"logical_expert_load": [[5, 5]]}]}"#,
            "[[[1, 2]], [[3, 4.5]]]",
            " [ [ [1]]]",
        ] {
            assert!(typed_windows(text.as_bytes()).is_some(), "{text}");
            let general =
                LoadHistory::from_json_value(&serde_json::from_str(text).unwrap()).unwrap();
            assert_eq!(LoadHistory::from_json_str(text).unwrap(), general, "{text}");
        }
        for text in ["[[1, \"x\"]]", "[[[1]], 2]", "{}", "{\"windows\": 3}", "7"] {
            assert!(typed_windows(text.as_bytes()).is_none(), "{text}");
        }
    }

    /// Bytes that are not UTF-8 are refused on every path, also where serde_json reading
    /// bytes would skip them (the value of a field it ignores).
    #[test]
    fn text_that_is_not_utf8_is_refused() {
        for bytes in [
            &b"{\"windows\": [[[1.5]]], \"note\": \"\xff\"}"[..],
            b"{\"windows\": [[[1]]], \"note\": \"\xff\"}",
            b"{\"load_history\": [{\"logical_expert_load\": [[1]], \"at\": \"\xc3\"}]}",
            b"[[1, 2]] \xff",
        ] {
            assert!(typed_windows(bytes).is_none(), "{bytes:?}");
            assert!(
                crate::formats::read_load_bytes(bytes, None).is_err(),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn parses_the_json_formats() {
        let a = LoadHistory::from_json_str("[[1, 2.5], [3, 4]]").unwrap();
        assert_eq!(a.num_windows(), 1);
        assert_eq!(a.num_layers(), 2);
        let b = LoadHistory::from_json_str(r#"{"windows": [[[1, 2]], [[3, 4]]]}"#).unwrap();
        assert_eq!(b.num_windows(), 2);
        assert_eq!(b.total(), vec![vec![4.0, 6.0]]);
        assert_eq!(b.last(), &[vec![3.0, 4.0]]);
        let c = LoadHistory::from_json_str(
            r#"{"load_history": [{"logical_expert_load": [[1, 2]]}, {"logical_expert_load": [[5, 0]]}]}"#,
        )
        .unwrap();
        assert_eq!(c.windows()[1], vec![vec![5.0, 0.0]]);
    }

    #[test]
    fn count_checks_name_the_first_bad_count_or_the_sum() {
        let m = f64::MAX;
        for (row, wanted) in [
            (vec![1.0, -0.0, 0.0], Ok(())),
            (vec![m / 2.0, m / 4.0], Ok(())),
            (vec![m / 2.0, m / 2.0, m / 2.0], Err("sum overflows")),
            (
                vec![1.0, f64::NAN, -1.0],
                Err("expert 1: count NaN is not a finite number"),
            ),
            (
                vec![1.0, -1.0, f64::NAN],
                Err("expert 1: count -1 is negative"),
            ),
            (
                vec![2.0; 9].into_iter().chain([f64::INFINITY]).collect(),
                Err("expert 9: count inf"),
            ),
            (
                vec![2.0; 17].into_iter().chain([-3.0]).collect(),
                Err("expert 17: count -3"),
            ),
            (vec![], Ok(())),
        ] {
            let found = check_counts(&row);
            assert_eq!(found, check_counts_in_order(&row), "{row:?}");
            match wanted {
                Ok(()) => assert!(found.is_ok(), "{row:?}: {found:?}"),
                Err(part) => assert!(found.is_err_and(|e| e.contains(part)), "{row:?}"),
            }
        }
    }

    proptest::proptest! {
        /// Rows of any length with counts of every kind, special values and counts near
        /// `f64::MAX` among them: the same verdict and message as the checks in order.
        #[test]
        fn count_checks_agree_with_the_checks_in_order(
            row in proptest::collection::vec(
                proptest::prop_oneof![
                    8 => 0.0..1e6f64,
                    1 => proptest::sample::select(vec![
                        -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::MAX,
                        f64::MAX / 3.0, f64::MIN_POSITIVE, -f64::MIN_POSITIVE,
                    ]),
                    1 => 1e300..f64::MAX,
                ],
                0..40,
            ),
        ) {
            proptest::prop_assert_eq!(check_counts(&row), check_counts_in_order(&row));
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let e = LoadHistory::from_json_str("[[1, 2], [3]]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 1") && e.contains("ragged"), "{e}");
        let e = LoadHistory::from_json_str("[[1, -2]]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("negative"), "{e}");
        let e = LoadHistory::from_json_str("[[1, \"NaN\"]]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a number"), "{e}");
        assert!(LoadHistory::from_json_str("[[1, NaN]]").is_err());
        assert!(LoadHistory::from_json_str("[]").is_err());
        assert!(LoadHistory::from_json_str("{\"windows\": []}").is_err());
        assert!(LoadHistory::from_json_str("{\"x\": 1}").is_err());
        assert!(LoadHistory::new(vec![vec![vec![f64::NAN]]]).is_err());
        assert!(LoadHistory::new(vec![vec![vec![f64::MAX, f64::MAX]]]).is_err());
        let e = LoadHistory::from_json_str(r#"{"windows": [[[1, 2]], [[1, 2], [3, 4]]]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("window 1 has 2 layers"), "{e}");
    }
}
