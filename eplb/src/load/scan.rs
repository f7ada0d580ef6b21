//! A scanner for load files made of integer token counts, the form every engine records:
//! `[L][E]`, `[W][L][E]` and `{"windows": [W][L][E]}`.
//!
//! serde_json's typed read of such a file took longer than `greedy` plans it (a DeepSeek-V3
//! history of 8 windows: 654 KB, 2.8 ms to read against 1.8 ms to plan, 2-core VM). This
//! scanner knows the shape in advance and reads numbers a word at a time: 1.0 ms for the same
//! file on the same machine. It only takes what it reads exactly as serde_json does: unsigned
//! integers of at most 19 digits (converted to `f64` as serde_json does), arrays, JSON
//! whitespace and that one key, all ASCII. Anything else (a fraction, an exponent, a sign,
//! another key, other bytes, malformed text) returns `None`, and the caller reads the file
//! with serde_json, whose errors and float rounding then apply unchanged.

/// The windows (`[W][L][E]`) and the format's name, or `None` for anything outside the
/// forms above.
pub(crate) fn integer_windows(text: &[u8]) -> Option<(Vec<Vec<Vec<f64>>>, &'static str)> {
    let mut s = Scanner {
        text,
        at: 0,
        second: Vec::new(),
    };
    let found = match s.peek()? {
        b'[' => match s.array_depth() {
            2 => (vec![s.matrix()?], "[L][E] array"),
            3 => (s.windows()?, "[W][L][E] array"),
            _ => return None,
        },
        b'{' => {
            s.at += 1;
            s.key(b"\"windows\"")?;
            let w = s.windows()?;
            s.eat(b'}')?;
            (w, "moectl windows")
        }
        _ => return None,
    };
    // Only whitespace may follow the value.
    (s.peek().is_none()).then_some(found)
}

/// The first position at or after `at` that is not JSON whitespace (space, LF, CR, tab).
fn after_space(text: &[u8], mut at: usize) -> usize {
    while text
        .get(at)
        .is_some_and(|c| matches!(c, b' ' | b'\n' | b'\r' | b'\t'))
    {
        at += 1;
    }
    at
}

struct Scanner<'a> {
    text: &'a [u8],
    at: usize,
    /// The second cursor's numbers in [`Scanner::counts`], kept from row to row.
    second: Vec<f64>,
}

impl Scanner<'_> {
    /// The next byte after JSON whitespace.
    fn peek(&mut self) -> Option<u8> {
        self.at = after_space(self.text, self.at);
        self.text.get(self.at).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.at += 1)
    }

    /// `"name"` then `:`.
    fn key(&mut self, quoted: &[u8]) -> Option<()> {
        self.peek()?;
        let rest = self.text.get(self.at..)?;
        rest.starts_with(quoted).then(|| self.at += quoted.len())?;
        self.eat(b':')
    }

    /// How many arrays open at the cursor (`[[[1` is 3), without moving it.
    fn array_depth(&mut self) -> usize {
        let start = self.at;
        let mut depth = 0;
        while self.peek() == Some(b'[') {
            depth += 1;
            self.at += 1;
        }
        self.at = start;
        depth
    }

    /// `[count, count, ...]`: unsigned integers as serde_json reads them into `f64`s.
    /// `capacity` is a guess of the length, `bytes` of the row's length in the text.
    ///
    /// Reading a number one after another is one long chain: where the next number starts
    /// waits for the length of this one (7 ns a number on the 2-core VM, 0.82 ms for the
    /// 118,784 counts of a DeepSeek-V3 history of 8 windows). So a row as long as `bytes` is read from both ends of it at once, two chains
    /// the processor runs side by side: a second cursor starts after the first comma past
    /// its middle (`split`). The first cursor must then arrive at exactly that comma, the
    /// second at the row's `]`. When the first meets a `]` first, the row was shorter than
    /// guessed and the second cursor's reading (a later row's bytes) is dropped. Each cursor
    /// checks the grammar as the one cursor did, so the row is taken exactly when it was.
    /// 0.62 ms for that history (best of 100, in process, same machine and sitting).
    fn counts(&mut self, capacity: usize, bytes: usize) -> Option<Vec<f64>> {
        self.eat(b'[')?;
        let mut first = Vec::with_capacity(capacity);
        if self.peek()? == b']' {
            self.at += 1;
            return Some(first);
        }
        let text = self.text;
        let mut at = self.at;
        // Short rows gain nothing from a second cursor.
        let split = (bytes > 64)
            .then(|| text.get(at + bytes / 2..))
            .flatten()
            .and_then(|rest| rest.iter().take(32).position(|&c| c == b','))
            .map(|offset| at + bytes / 2 + offset);
        let Some(split) = split else {
            // One cursor to the end.
            loop {
                let (value, separator, next) = count(text, at)?;
                first.push(value);
                at = next;
                if let Separator::Close = separator {
                    self.at = at;
                    return Some(first);
                }
            }
        };
        let mut second = std::mem::take(&mut self.second);
        second.clear();
        let mut second_at = split + 1;
        // `Some(true)`: the second cursor met `]`; `None`: it failed, which matters only if the
        // first cursor reaches the split.
        let mut second_done = Some(false);
        loop {
            let (value, separator, next) = count(text, at)?;
            first.push(value);
            at = next;
            match separator {
                Separator::Close => {
                    self.second = second;
                    self.at = at;
                    return Some(first);
                }
                Separator::Comma if at == split + 1 => break,
                Separator::Comma => {}
            }
            if second_done == Some(false) {
                second_done = count(text, second_at).map(|(value, separator, next)| {
                    second.push(value);
                    second_at = next;
                    matches!(separator, Separator::Close)
                });
            }
        }
        while !second_done? {
            let (value, separator, next) = count(text, second_at)?;
            second.push(value);
            second_at = next;
            second_done = Some(matches!(separator, Separator::Close));
        }
        first.extend_from_slice(&second);
        self.second = second;
        self.at = second_at;
        Some(first)
    }

    /// `[item, item, ...]`; `capacity` is a guess of its length.
    fn list<T>(
        &mut self,
        capacity: usize,
        mut item: impl FnMut(&mut Self) -> Option<T>,
    ) -> Option<Vec<T>> {
        self.eat(b'[')?;
        let mut out = Vec::with_capacity(capacity);
        if self.peek()? == b']' {
            self.at += 1;
            return Some(out);
        }
        loop {
            out.push(item(self)?);
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(out);
                }
                _ => return None,
            }
        }
    }

    /// `[L][E]`; every row is allocated at the previous row's length.
    fn matrix(&mut self) -> Option<Vec<Vec<f64>>> {
        let (mut width, mut bytes) = (0, 0);
        self.list(0, |s| {
            let start = s.at;
            let row = s.counts(width, bytes)?;
            (width, bytes) = (row.len(), s.at - start);
            Some(row)
        })
    }

    fn windows(&mut self) -> Option<Vec<Vec<Vec<f64>>>> {
        self.list(0, Scanner::matrix)
    }
}

/// What ends a count in a row.
enum Separator {
    Comma,
    Close,
}

/// `ws* count ws*` and then `,` or `]`, from `at`: the count, what ended it and the position
/// after that. `None` for anything else: no digits, a leading zero, 20 digits or more, another
/// byte.
#[inline(always)]
fn count(text: &[u8], at: usize) -> Option<(f64, Separator, usize)> {
    let mut i = after_space(text, at);
    let value = match text.get(i..i + 8).and_then(short_number) {
        Some((value, digits)) => {
            // No digits, or a leading zero (not JSON): fewer than `digits` digits' worth.
            if digits == 0 || (digits > 1 && value < POWERS[digits - 1]) {
                return None;
            }
            i += digits;
            value as f64
        }
        None => {
            let (value, digits) = long_number(text.get(i..)?);
            if digits == 0 || digits > 19 || (digits > 1 && text[i] == b'0') {
                return None;
            }
            i += digits;
            value as f64
        }
    };
    i = after_space(text, i);
    let separator = match text.get(i)? {
        b',' => Separator::Comma,
        b']' => Separator::Close,
        _ => return None,
    };
    Some((value, separator, i + 1))
}

/// 10^k: a number of k + 1 digits below 10^k starts with a zero.
const POWERS: [u64; 8] = [1, 10, 100, 1000, 10_000, 100_000, 1_000_000, 10_000_000];

/// The number of 0-7 digits at the start of 8 bytes, and how many digits it has, in a few
/// word operations instead of a loop per digit (counts in load files have 1-6 digits):
/// `(0, 0)` when the first byte is not a digit, `None` when all 8 bytes are digits.
fn short_number(bytes: &[u8]) -> Option<(u64, usize)> {
    let word = u64::from_le_bytes(bytes.try_into().ok()?);
    let values = word ^ 0x3030_3030_3030_3030; // b'0'..=b'9' become 0..=9
    // High bit of each byte that is not a digit: its value is 10 or more (the +0x76 carries
    // into the high bit) or it had the high bit already. No carry crosses into the next byte:
    // with the high bits masked off a byte is at most 0x7f, and 0x7f + 0x76 = 0xf5.
    let not_digit = (((values & 0x7f7f_7f7f_7f7f_7f7f) + 0x7676_7676_7676_7676) | values)
        & 0x8080_8080_8080_8080;
    if not_digit == 0 {
        return None;
    }
    let digits = (not_digit.trailing_zeros() / 8) as usize;
    if digits == 0 {
        return Some((0, 0));
    }
    // The digits to the top bytes, zeros (leading zero digits) below them; then pairs, fours
    // and eights of digits are combined (the first byte is the most significant digit).
    let mut v = values << (8 * (8 - digits));
    v = (v.wrapping_mul(10) + (v >> 8)) & 0x00ff_00ff_00ff_00ff;
    v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_ffff_0000_ffff;
    v = (v.wrapping_mul(10_000) + (v >> 32)) & 0xffff_ffff;
    Some((v, digits))
}

/// The digits at the start of `bytes` one at a time (numbers of 8 digits or more, and the
/// last bytes of the text): value and digit count. Past 19 digits the value is meaningless
/// (the caller refuses those).
fn long_number(bytes: &[u8]) -> (u64, usize) {
    let mut value: u64 = 0;
    let mut digits = 0;
    for &c in bytes {
        let digit = c.wrapping_sub(b'0');
        if digit > 9 {
            break;
        }
        value = value.wrapping_mul(10).wrapping_add(u64::from(digit));
        digits += 1;
    }
    (value, digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde_windows(text: &str) -> Vec<Vec<Vec<f64>>> {
        if let Ok(m) = serde_json::from_str::<Vec<Vec<f64>>>(text) {
            return vec![m];
        }
        if let Ok(w) = serde_json::from_str::<Vec<Vec<Vec<f64>>>>(text) {
            return w;
        }
        #[derive(serde::Deserialize)]
        struct Windows {
            windows: Vec<Vec<Vec<f64>>>,
        }
        serde_json::from_str::<Windows>(text)
            .map(|w| w.windows)
            .unwrap()
    }

    /// The word-at-a-time reader agrees with the digit loop for every byte value (digits
    /// with the high bit set, `/` and `:` next to the digits included) after 0-7 digits,
    /// with digits or anything else after it.
    #[test]
    fn short_numbers_read_like_the_digit_loop() {
        for digits in 0..8 {
            for byte in 0..=255u8 {
                for after in [b'0', b'9', b',', 0xb5] {
                    let mut bytes = b"9081726"[..digits].to_vec();
                    bytes.push(byte);
                    bytes.resize(8, after);
                    match short_number(&bytes) {
                        Some(found) => assert_eq!(found, long_number(&bytes), "{bytes:?}"),
                        None => assert_eq!(long_number(&bytes).1, 8, "{bytes:?}"),
                    }
                }
            }
        }
    }

    /// What the scanner takes, it reads as serde_json does.
    #[test]
    fn reads_integer_counts_as_serde_json_does() {
        for (text, format) in [
            ("[[1, 2], [3, 40]]", "[L][E] array"),
            ("[[]]", "[L][E] array"),
            (" [ [ [1]\n,[ 0 ] ] ]\t", "[W][L][E] array"),
            ("[[[1, 2]], [[3, 4]]]", "[W][L][E] array"),
            ("{\"windows\": [[[1, 2]], [[3, 4]]]}", "moectl windows"),
            (" {\n \"windows\" :[[[7]]] } ", "moectl windows"),
            // Above 2^53: rounded to the nearest f64, as serde_json does.
            ("[[9999999999999999999, 9007199254740993]]", "[L][E] array"),
        ] {
            let (w, f) = integer_windows(text.as_bytes()).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(f, format, "{text}");
            assert_eq!(w, serde_windows(text), "{text}");
        }
    }

    /// Everything else is left to serde_json: fractions, exponents, signs, other keys,
    /// numbers of 20 digits and more, and text that is not JSON.
    #[test]
    fn leaves_everything_else_to_serde_json() {
        for text in [
            "[[1.5]]",
            "[[1e3]]",
            "[[-1]]",
            "[[+1]]",
            "[[01]]",
            "[[18446744073709551615]]",
            "[[00]]",
            "[[1,]]",
            "[[,1]]",
            "[[1, 2],]",
            "[[1 2]]",
            "[[1]] x",
            "[[1]",
            "[1, 2]",
            "[]",
            "[[[[1]]]]",
            "{\"load_history\": []}",
            "{\"windows\": [[[1]]], \"extra\": 1}",
            "{\"windows\": [[[1]]], \"windows\": [[[2]]]}",
            "{\"windows\": [[1]]}",
            "{\"windows\" [[[1]]]}",
            "",
            "7",
        ] {
            assert!(integer_windows(text.as_bytes()).is_none(), "{text}");
        }
    }

    /// Counts of every length the scanner handles (1 to 19 digits), short ones most often.
    fn count() -> impl proptest::strategy::Strategy<Value = u64> {
        proptest::prop_oneof![
            0u64..10,
            0u64..100_000,
            0u64..100_000_000,
            0u64..10_000_000_000_000_000_000,
        ]
    }

    /// `[W][L][E]` as JSON, bare or as `{"windows": ...}`.
    fn history_json(w: &[Vec<Vec<u64>>], wrapped: bool) -> serde_json::Value {
        if wrapped {
            serde_json::json!({ "windows": w })
        } else {
            serde_json::json!(w)
        }
    }

    /// serde_json's typed read, `None` where it refuses the text.
    fn serde_typed(text: &[u8]) -> Option<Vec<Vec<Vec<f64>>>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Windows {
            windows: Vec<Vec<Vec<f64>>>,
        }
        serde_json::from_slice::<Vec<Vec<f64>>>(text)
            .map(|m| vec![m])
            .or_else(|_| serde_json::from_slice::<Vec<Vec<Vec<f64>>>>(text))
            .or_else(|_| serde_json::from_slice::<Windows>(text).map(|w| w.windows))
            .ok()
    }

    /// `text` with bytes replaced, inserted or removed: `(position, kind, byte)`, the
    /// position taken modulo the length.
    fn damaged(mut text: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
        for &(at, kind, byte) in edits {
            let at = at % (text.len() + 1);
            match kind {
                0 if at < text.len() => text[at] = byte,
                1 => text.insert(at, byte),
                _ if at < text.len() => {
                    text.remove(at);
                }
                _ => text.push(byte),
            }
        }
        text
    }

    /// Rows read by two cursors: long rows after short ones and short after long (the second
    /// cursor's start, guessed from the row before, then lies in a later row, on the comma
    /// between two rows, or in the middle of a number), with Python's `json.dump` spacing and
    /// compact; and long rows that are wrong only in their second half, or only past the
    /// middle comma the second cursor starts after.
    #[test]
    fn rows_read_by_two_cursors() {
        let long: Vec<u64> = (0..200).map(|i| (i * 7919) % 100_003).collect();
        let rows = |lengths: &[usize]| -> Vec<Vec<u64>> {
            lengths.iter().map(|&n| long[..n].to_vec()).collect()
        };
        for lengths in [
            &[200, 200, 200][..],
            &[200, 3, 200],
            &[200, 0, 200, 1],
            &[150, 40, 39, 38, 200],
            &[60, 200, 20, 200, 20],
        ] {
            let w = vec![rows(lengths), rows(lengths)];
            for text in [
                serde_json::to_string(&w).unwrap(),
                serde_json::to_string(&serde_json::json!({ "windows": w }))
                    .unwrap()
                    .replace(',', ", "),
                serde_json::to_string_pretty(&w).unwrap(),
            ] {
                let (read, _) = integer_windows(text.as_bytes()).unwrap();
                assert_eq!(read, serde_windows(&text), "{lengths:?}");
            }
        }
        let good: Vec<String> = long.iter().map(u64::to_string).collect();
        let row = |items: &[String]| format!("[{}]", items.join(", "));
        for (at, bad) in [
            (150, "-1"),
            (199, "1.5"),
            (120, "01"),
            (101, ""),
            (100, "x"),
        ] {
            let mut items = good.clone();
            items[at] = bad.to_string();
            let text = format!("[{}, {}, {}]", row(&good), row(&items), row(&good));
            // Left to serde_json, which reads the sign and the fraction and refuses the rest.
            assert!(integer_windows(text.as_bytes()).is_none(), "{at} {bad}");
            assert_eq!(
                serde_typed(text.as_bytes()).is_some(),
                at >= 150,
                "{at} {bad}"
            );
        }
    }

    proptest::proptest! {
        /// Damaged files (bytes changed, inserted or removed, JSON's own characters and
        /// non-ASCII bytes among them): the scanner refuses them, or reads what serde_json
        /// reads.
        #[test]
        fn damaged_text_is_refused_or_read_as_serde_json_reads_it(
            w in proptest::collection::vec(
                proptest::collection::vec(proptest::collection::vec(count(), 1..4), 1..3),
                1..3,
            ),
            wrapped: bool,
            edits in proptest::collection::vec(
                (0usize..1000, 0u8..3, proptest::sample::select(
                    b"0123456789-+.eE[]{},: \t\r\n\"w\x80\xb5\xff".to_vec(),
                )),
                1..4,
            ),
        ) {
            let text = damaged(serde_json::to_vec(&history_json(&w, wrapped)).unwrap(), &edits);
            if let Some((read, _)) = integer_windows(&text) {
                proptest::prop_assert_eq!(Some(read), serde_typed(&text));
            }
        }

        /// The same with rows long enough to be read by two cursors (and rows of different
        /// lengths, so that the second cursor's guess often lands past a row's end), edits
        /// anywhere in them: refused, or read as serde_json reads them.
        #[test]
        fn damaged_long_rows_are_refused_or_read_as_serde_json_reads_them(
            w in proptest::collection::vec(
                proptest::collection::vec(proptest::collection::vec(count(), 0..90), 1..5),
                1..3,
            ),
            pretty: bool,
            edits in proptest::collection::vec(
                (0usize..100_000, 0u8..3, proptest::sample::select(
                    b"0123456789-+.eE[]{},: \t\r\n\"w\x80\xb5\xff".to_vec(),
                )),
                1..4,
            ),
        ) {
            let value = history_json(&w, false);
            let text = if pretty {
                serde_json::to_vec_pretty(&value).unwrap()
            } else {
                serde_json::to_vec(&value).unwrap()
            };
            let text = damaged(text, &edits);
            if let Some((read, _)) = integer_windows(&text) {
                proptest::prop_assert_eq!(Some(read), serde_typed(&text));
            }
        }

        /// Any integer history, written by serde_json with any indentation, reads back equal:
        /// short rows (one cursor) and long ones (two) of any lengths.
        #[test]
        fn any_integer_history_reads_back(
            w in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![
                        proptest::collection::vec(count(), 0..6),
                        proptest::collection::vec(count(), 0..300),
                    ],
                    1..5,
                ),
                1..4,
            ),
            pretty: bool,
            wrapped: bool,
        ) {
            let value = history_json(&w, wrapped);
            let text = if pretty {
                serde_json::to_string_pretty(&value).unwrap()
            } else {
                serde_json::to_string(&value).unwrap()
            };
            let (read, _) = integer_windows(text.as_bytes()).unwrap();
            proptest::prop_assert_eq!(read, serde_windows(&text));
        }
    }
}
