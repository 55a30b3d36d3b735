//! Text segments (RFC 7143 §6): `key=value\0` pairs as login and text requests carry them,
//! parsed with bounds on their number and sizes and with duplicate keys refused; the builder
//! of response segments; and the encodings of binary values (`0x` hex, `0b` base64) CHAP uses.

use memchr::memchr;
use smallvec::SmallVec;
use thiserror::Error;

/// Keys one request segment may carry: RFC 7143 defines about thirty login keys and a
/// request negotiates each at most once, so more is an attack, not an initiator.
pub const KEYS_MAX: usize = 64;
/// Longest key name (§6.1: 63 bytes).
pub const KEY_LEN_MAX: usize = 63;
/// Longest value: a binary value of up to 1024 bytes (§6.1 bounds text values at 255 bytes
/// but binary ones only by the segment; CHAP challenges and responses here stay well under
/// 1 KiB) hex-encoded with its `0x` prefix.
pub const VALUE_LEN_MAX: usize = 2 + 2 * BINARY_LEN_MAX;
/// Longest decoded binary value accepted.
pub const BINARY_LEN_MAX: usize = 1024;
/// Longest text a login or text exchange may gather over C-bit continuations: every key at
/// its longest would be more, but real exchanges are a few hundred bytes.
pub const TEXT_LEN_MAX: usize = 64 * 1024;

/// Errors in a text segment.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TextError {
    /// A pair without `=`.
    #[error("text pair without '='")]
    NoEquals,
    /// An empty key name, or one with characters §6.1 does not allow.
    #[error("malformed key name")]
    BadKey,
    /// A key name over [`KEY_LEN_MAX`] bytes.
    #[error("key name longer than {KEY_LEN_MAX} bytes")]
    KeyTooLong,
    /// A value over [`VALUE_LEN_MAX`] bytes.
    #[error("value of {0} longer than {VALUE_LEN_MAX} bytes")]
    ValueTooLong(String),
    /// Not UTF-8.
    #[error("text is not UTF-8")]
    NotUtf8,
    /// More than [`KEYS_MAX`] pairs.
    #[error("more than {KEYS_MAX} keys")]
    TooManyKeys,
    /// A key sent twice in one request.
    #[error("key {0} sent twice")]
    Duplicate(String),
    /// The gathered text exceeds [`TEXT_LEN_MAX`].
    #[error("text longer than {TEXT_LEN_MAX} bytes")]
    TooLong,
    /// A binary value that is neither `0x` hex nor `0b` base64, or too long.
    #[error("malformed binary value")]
    BadBinary,
}

/// The pairs of one request, in order.
pub type Pairs<'a> = SmallVec<[(&'a str, &'a str); 32]>;

fn key_ok(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'@' | b'_'))
}

/// Parses a text segment: `key=value` pairs each ended by a NUL (the last NUL may be
/// missing; empty entries, such as padding NULs, are skipped). Refuses duplicates.
pub fn parse(data: &[u8]) -> Result<Pairs<'_>, TextError> {
    if data.len() > TEXT_LEN_MAX {
        return Err(TextError::TooLong);
    }
    let mut pairs = Pairs::new();
    let mut rest = data;
    while !rest.is_empty() {
        let end = memchr(0, rest).unwrap_or(rest.len());
        let entry = &rest[..end];
        rest = &rest[(end + 1).min(rest.len())..];
        if entry.is_empty() {
            continue;
        }
        let eq = memchr(b'=', entry).ok_or(TextError::NoEquals)?;
        let key = std::str::from_utf8(&entry[..eq]).map_err(|_| TextError::NotUtf8)?;
        let value = std::str::from_utf8(&entry[eq + 1..]).map_err(|_| TextError::NotUtf8)?;
        if key.len() > KEY_LEN_MAX {
            return Err(TextError::KeyTooLong);
        }
        if !key_ok(key) {
            return Err(TextError::BadKey);
        }
        if value.len() > VALUE_LEN_MAX {
            return Err(TextError::ValueTooLong(key.to_string()));
        }
        if pairs.len() >= KEYS_MAX {
            return Err(TextError::TooManyKeys);
        }
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(TextError::Duplicate(key.to_string()));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// The value of `key` among `pairs`.
pub fn get<'a>(pairs: &Pairs<'a>, key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// Builds a response text segment.
#[derive(Debug, Default, Clone)]
pub struct TextBuilder {
    buf: Vec<u8>,
}

impl TextBuilder {
    /// An empty segment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `key=value\0`.
    pub fn push(&mut self, key: &str, value: &str) -> &mut Self {
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.push(b'=');
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self
    }

    /// The bytes so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The segment.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Encodes a binary value as `0x` hex (§6.1 binary-value).
pub fn encode_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("0x");
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn b64_digit(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// Decodes a binary value: `0x`/`0X` hex (an odd digit count has an implied leading zero)
/// or `0b`/`0B` base64 (RFC 4648, with `=` padding). At most [`BINARY_LEN_MAX`] bytes.
pub fn decode_binary(v: &str) -> Result<Vec<u8>, TextError> {
    let b = v.as_bytes();
    if b.len() < 3 || b[0] != b'0' {
        return Err(TextError::BadBinary);
    }
    let body = &b[2..];
    match b[1] {
        b'x' | b'X' => {
            if body.len().div_ceil(2) > BINARY_LEN_MAX {
                return Err(TextError::BadBinary);
            }
            let mut out = Vec::with_capacity(body.len().div_ceil(2));
            let (first, rest) = body.split_at(body.len() % 2);
            if let Some(&c) = first.first() {
                out.push(hex_digit(c).ok_or(TextError::BadBinary)?);
            }
            for pair in rest.chunks_exact(2) {
                let hi = hex_digit(pair[0]).ok_or(TextError::BadBinary)?;
                let lo = hex_digit(pair[1]).ok_or(TextError::BadBinary)?;
                out.push(hi << 4 | lo);
            }
            Ok(out)
        }
        b'b' | b'B' => {
            if !body.len().is_multiple_of(4) || body.len() / 4 * 3 > BINARY_LEN_MAX + 2 {
                return Err(TextError::BadBinary);
            }
            let pads = body.iter().rev().take_while(|&&c| c == b'=').count();
            if pads > 2 {
                return Err(TextError::BadBinary);
            }
            let mut out = Vec::with_capacity(body.len() / 4 * 3);
            for (i, quad) in body.chunks_exact(4).enumerate() {
                let last = i + 1 == body.len() / 4;
                let digits = if last { 4 - pads } else { 4 };
                let mut n = 0u32;
                for (j, &c) in quad.iter().enumerate() {
                    let d = if j < digits {
                        b64_digit(c).ok_or(TextError::BadBinary)?
                    } else {
                        0
                    };
                    n = n << 6 | u32::from(d);
                }
                let bytes = n.to_be_bytes();
                let keep = if last { 3 - pads } else { 3 };
                out.extend_from_slice(&bytes[1..1 + keep]);
            }
            if out.len() > BINARY_LEN_MAX || out.is_empty() {
                return Err(TextError::BadBinary);
            }
            Ok(out)
        }
        _ => Err(TextError::BadBinary),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_in_order() {
        let p = parse(b"InitiatorName=iqn.x:y\0SessionType=Normal\0\0").expect("ok");
        assert_eq!(
            p.as_slice(),
            &[("InitiatorName", "iqn.x:y"), ("SessionType", "Normal")]
        );
        assert_eq!(get(&p, "SessionType"), Some("Normal"));
        assert_eq!(get(&p, "TargetName"), None);
        // Missing last NUL, empty value, '=' inside a value.
        let p = parse(b"A=\0B=x=y").expect("ok");
        assert_eq!(p.as_slice(), &[("A", ""), ("B", "x=y")]);
        assert!(parse(b"").expect("ok").is_empty());
    }

    #[test]
    fn refuses_malformed_text() {
        assert_eq!(parse(b"novalue\0"), Err(TextError::NoEquals));
        assert_eq!(parse(b"=v\0"), Err(TextError::BadKey));
        assert_eq!(parse(b"a b=v\0"), Err(TextError::BadKey));
        assert_eq!(parse(b"k=\xff\0"), Err(TextError::NotUtf8));
        assert_eq!(
            parse(b"K=1\0L=2\0K=3\0"),
            Err(TextError::Duplicate("K".into()))
        );
        let long_key = format!("{}=1\0", "k".repeat(KEY_LEN_MAX + 1));
        assert_eq!(parse(long_key.as_bytes()), Err(TextError::KeyTooLong));
        let ok_key = format!("{}=1\0", "k".repeat(KEY_LEN_MAX));
        assert!(parse(ok_key.as_bytes()).is_ok());
        let long_value = format!("k={}\0", "v".repeat(VALUE_LEN_MAX + 1));
        assert_eq!(
            parse(long_value.as_bytes()),
            Err(TextError::ValueTooLong("k".into()))
        );
        let many: String = (0..=KEYS_MAX).map(|i| format!("K{i}=1\0")).collect();
        assert_eq!(parse(many.as_bytes()), Err(TextError::TooManyKeys));
        let huge = vec![0u8; TEXT_LEN_MAX + 1];
        assert_eq!(parse(&huge), Err(TextError::TooLong));
    }

    #[test]
    fn builder_writes_nul_terminated_pairs() {
        let mut t = TextBuilder::new();
        assert!(t.is_empty());
        t.push("TargetName", "iqn.a:b")
            .push("TargetAddress", "1.2.3.4:3260,1");
        assert_eq!(
            t.as_bytes(),
            b"TargetName=iqn.a:b\0TargetAddress=1.2.3.4:3260,1\0"
        );
        let bytes = t.into_bytes();
        assert_eq!(parse(&bytes).expect("ok").len(), 2);
    }

    #[test]
    fn binary_values() {
        assert_eq!(encode_hex(&[0x01, 0xab, 0xff]), "0x01abff");
        assert_eq!(decode_binary("0x01ABff"), Ok(vec![1, 0xab, 0xff]));
        assert_eq!(decode_binary("0X1ab"), Ok(vec![1, 0xab]));
        assert_eq!(decode_binary("0b AQ=="), Err(TextError::BadBinary));
        assert_eq!(decode_binary("0bAQ=="), Ok(vec![1]));
        assert_eq!(decode_binary("0BAQI="), Ok(vec![1, 2]));
        assert_eq!(decode_binary("0bAQID"), Ok(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQIDBA=="), Ok(vec![1, 2, 3, 4]));
        assert_eq!(decode_binary("0b////"), Ok(vec![0xff, 0xff, 0xff]));
        for bad in [
            "",
            "0x",
            "1x00",
            "0xzz",
            "0bA",
            "0bA===",
            "0bA=AA",
            "0bAQ==AQID",
            "0y00",
        ] {
            assert_eq!(decode_binary(bad), Err(TextError::BadBinary), "{bad}");
        }
        let too_long = encode_hex(&vec![0u8; BINARY_LEN_MAX + 1]);
        assert_eq!(decode_binary(&too_long), Err(TextError::BadBinary));
        let max = encode_hex(&vec![7u8; BINARY_LEN_MAX]);
        assert_eq!(decode_binary(&max).map(|v| v.len()), Ok(BINARY_LEN_MAX));
    }
}
