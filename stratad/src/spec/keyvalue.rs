//! The `key=value[,key=value...]` form of the command-line specs, as a serde deserializer.
//!
//! Syntax (QEMU's `-drive`/`-device` style):
//! - items are separated by `,`; `,,` inside a value is a literal comma
//!   (`path=/images/a,,b.img` is the path `/images/a,b.img`);
//! - an item is `key=value`, split at its first `=` (so a value may hold `=`);
//! - an item without `=` continues the list of the key before it
//!   (`steer=3260,4420` is the list `[3260, 4420]`); a key that takes one value refuses it;
//! - empty items (a leading or trailing `,`) are ignored; a key may appear once.
//!
//! Values are text, read as what the target field asks for: `on|off` (also
//! `true|false|yes|no|1|0`) for booleans, decimal numbers, enum variants by name, lists
//! for sequences, `Some` for options that are present. Structs are flat: one level of keys.
//! The same structs read JSON objects with `serde_json` (see [`from_json`]); their fields'
//! serde names are the keys of both forms.

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};

use super::SpecError;

/// Longest spec accepted: three paths of PATH_MAX and the options beside them. The kernel
/// bounds one argument at 128 KiB; this bound keeps a hostile spec from costing more.
pub const SPEC_BYTES_MAX: usize = 16 << 10;

/// One key and its values (one unless bare items continued it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    key: String,
    values: Vec<String>,
}

/// Splits `s` into items at single commas, turning `,,` into a literal comma.
fn items(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            cur.push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            cur.push(',');
        } else {
            out.push(std::mem::take(&mut cur));
        }
    }
    out.push(cur);
    out
}

/// Parses `s` into its entries, in order: checks the syntax, not the keys.
fn entries(s: &str) -> Result<Vec<Entry>, SpecError> {
    if s.len() > SPEC_BYTES_MAX {
        return Err(SpecError::Syntax(format!(
            "longer than {SPEC_BYTES_MAX} bytes"
        )));
    }
    let mut out: Vec<Entry> = Vec::new();
    for item in items(s).into_iter().filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some(("", _)) => return Err(SpecError::NotKeyValue(item)),
            Some((key, value)) => {
                if out.iter().any(|e| e.key == key) {
                    return Err(SpecError::Duplicate(key.to_string()));
                }
                out.push(Entry {
                    key: key.to_string(),
                    values: vec![value.to_string()],
                });
            }
            None => match out.last_mut() {
                Some(last) => last.values.push(item),
                None => return Err(SpecError::NotKeyValue(item)),
            },
        }
    }
    Ok(out)
}

/// Reads a `T` (a flat struct) from its key=value form.
pub fn from_str<T: DeserializeOwned>(s: &str) -> Result<T, SpecError> {
    T::deserialize(MapDe {
        entries: entries(s)?.into_iter(),
        current: None,
    })
}

/// Reads a `T` from a JSON value (the config file's and RPC params' form of the same spec;
/// only the tests read JSON until those land).
#[cfg(test)]
pub fn from_json<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, SpecError> {
    serde_json::from_value(v).map_err(|e| SpecError::Syntax(e.to_string()))
}

/// Escapes `v` for a key=value spec: every comma doubled (the tests' formatter).
#[cfg(test)]
pub fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

impl de::Error for SpecError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        SpecError::Syntax(msg.to_string())
    }

    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        SpecError::UnknownKey(field.to_string())
    }

    fn missing_field(field: &'static str) -> Self {
        SpecError::Missing(field.to_string())
    }

    fn duplicate_field(field: &'static str) -> Self {
        SpecError::Duplicate(field.to_string())
    }
}

/// The whole spec: a map of its entries.
struct MapDe {
    entries: std::vec::IntoIter<Entry>,
    /// The entry whose key was handed out and whose value is next.
    current: Option<Entry>,
}

impl<'de> de::Deserializer<'de> for MapDe {
    type Error = SpecError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        visitor.visit_map(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

impl<'de> de::MapAccess<'de> for MapDe {
    type Error = SpecError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, SpecError> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        let key = entry.key.clone();
        self.current = Some(entry);
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, SpecError> {
        let Entry { key, values } = self
            .current
            .take()
            .ok_or_else(|| SpecError::Syntax("value without a key".into()))?;
        let value = values.join(",");
        seed.deserialize(ValueDe { values }).map_err(|e| match e {
            SpecError::Syntax(why) => SpecError::BadValue { key, value, why },
            other => other,
        })
    }
}

/// The value(s) of one key.
struct ValueDe {
    values: Vec<String>,
}

impl ValueDe {
    fn single(self) -> Result<String, SpecError> {
        let mut values = self.values;
        if values.len() == 1 {
            if let Some(v) = values.pop() {
                return Ok(v);
            }
        }
        Err(SpecError::Syntax(
            "takes one value (write ,, for a comma inside a value)".into(),
        ))
    }

    fn number<T: std::str::FromStr>(self) -> Result<T, SpecError>
    where
        T::Err: std::fmt::Display,
    {
        let v = self.single()?;
        v.parse()
            .map_err(|e| SpecError::Syntax(format!("expected a number: {e}")))
    }
}

macro_rules! numbers {
    ($($method:ident => $visit:ident),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
                visitor.$visit(self.number()?)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for ValueDe {
    type Error = SpecError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        if self.values.len() == 1 {
            visitor.visit_string(self.single()?)
        } else {
            self.deserialize_seq(visitor)
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        match self.single()?.as_str() {
            "on" | "true" | "yes" | "1" => visitor.visit_bool(true),
            "off" | "false" | "no" | "0" => visitor.visit_bool(false),
            _ => Err(SpecError::Syntax("expected on or off".into())),
        }
    }

    numbers! {
        deserialize_i8 => visit_i8, deserialize_i16 => visit_i16, deserialize_i32 => visit_i32,
        deserialize_i64 => visit_i64, deserialize_i128 => visit_i128,
        deserialize_u8 => visit_u8, deserialize_u16 => visit_u16, deserialize_u32 => visit_u32,
        deserialize_u64 => visit_u64, deserialize_u128 => visit_u128,
        deserialize_f32 => visit_f32, deserialize_f64 => visit_f64,
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        visitor.visit_string(self.single()?)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        visitor.visit_byte_buf(self.single()?.into_bytes())
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        // A key that is present has a value.
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, SpecError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, SpecError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        visitor.visit_seq(de::value::SeqDeserializer::new(
            self.values.into_iter().map(|v| ValueDe { values: vec![v] }),
        ))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, SpecError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, SpecError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, SpecError> {
        Err(SpecError::Syntax(
            "a nested value cannot be given here".into(),
        ))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, SpecError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, SpecError> {
        let v: de::value::StringDeserializer<SpecError> = self.single()?.into_deserializer();
        visitor.visit_enum(v)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        self.deserialize_string(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, SpecError> {
        visitor.visit_unit()
    }
}

impl<'de> IntoDeserializer<'de, SpecError> for ValueDe {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Sample {
        path: String,
        on: Option<bool>,
        count: Option<u32>,
        list: Option<Vec<u16>>,
        kind: Option<Kind>,
    }

    #[derive(Debug, Deserialize, PartialEq, Clone, Copy)]
    #[serde(rename_all = "snake_case")]
    enum Kind {
        AfXdp,
        Plain,
    }

    fn sample(s: &str) -> Result<Sample, SpecError> {
        from_str(s)
    }

    #[test]
    fn items_unescape_double_commas() {
        assert_eq!(items("a=1,b=2"), ["a=1", "b=2"]);
        assert_eq!(items("a=x,,y,b=2"), ["a=x,y", "b=2"]);
        assert_eq!(items("a=x,,,b=2"), ["a=x,", "b=2"]);
        assert_eq!(items("a=,,,,"), ["a=,,"]);
        assert_eq!(items(""), [""]);
    }

    #[test]
    fn reads_scalars_lists_and_enums() {
        let s = sample("path=/a,,b=c,on=on,count=7,list=1,2,3,kind=af_xdp").unwrap();
        assert_eq!(
            s,
            Sample {
                path: "/a,b=c".into(),
                on: Some(true),
                count: Some(7),
                list: Some(vec![1, 2, 3]),
                kind: Some(Kind::AfXdp),
            }
        );
        let s = sample("path=p,").unwrap();
        assert_eq!((s.on, s.count, s.list), (None, None, None));
        for (v, b) in [("off", false), ("false", false), ("yes", true), ("1", true)] {
            assert_eq!(sample(&format!("path=p,on={v}")).unwrap().on, Some(b));
        }
    }

    #[test]
    fn errors_name_the_key() {
        let bad = |r: Result<Sample, SpecError>, key: &str, value: &str| match r {
            Err(SpecError::BadValue {
                key: k, value: v, ..
            }) => k == key && v == value,
            _ => false,
        };
        assert!(bad(sample("path=p,on=maybe"), "on", "maybe"));
        assert!(bad(sample("path=p,count=x"), "count", "x"));
        assert!(bad(sample("path=p,count=1,2"), "count", "1,2"));
        assert!(bad(sample("path=a,b"), "path", "a,b"));
        assert!(bad(sample("path=p,kind=nope"), "kind", "nope"));
        assert!(bad(sample("path=p,list=1,x"), "list", "1,x"));
        assert_eq!(
            sample("path=p,colour=red"),
            Err(SpecError::UnknownKey("colour".into()))
        );
        assert_eq!(sample("on=on"), Err(SpecError::Missing("path".into())));
        assert_eq!(
            sample("path=p,path=q"),
            Err(SpecError::Duplicate("path".into()))
        );
        assert_eq!(sample("path"), Err(SpecError::NotKeyValue("path".into())));
        assert_eq!(sample("=p"), Err(SpecError::NotKeyValue("=p".into())));
        assert!(matches!(
            sample(&"x".repeat(SPEC_BYTES_MAX + 1)),
            Err(SpecError::Syntax(_))
        ));
        let msg = sample("path=p,count=x").unwrap_err().to_string();
        assert!(msg.contains("'count'") && msg.contains("'x'"), "{msg}");
    }

    #[test]
    fn json_gives_the_same_struct() {
        let kv = sample("path=/a,,b,on=off,count=3,list=4420,kind=plain").unwrap();
        let json = from_json::<Sample>(serde_json::json!({
            "path": "/a,b", "on": false, "count": 3, "list": [4420], "kind": "plain"
        }))
        .unwrap();
        assert_eq!(kv, json);
        assert!(matches!(
            from_json::<Sample>(serde_json::json!({"path": "p", "colour": 1})),
            Err(SpecError::Syntax(_))
        ));
    }

    proptest! {
        #[test]
        fn escaped_values_round_trip(path in ".{0,40}", list in proptest::collection::vec(any::<u16>(), 1..5),
                                     count in proptest::option::of(any::<u32>()),
                                     on in proptest::option::of(any::<bool>())) {
            let mut s = format!("path={}", escape(&path));
            if let Some(c) = count {
                s += &format!(",count={c}");
            }
            if let Some(b) = on {
                s += if b { ",on=on" } else { ",on=off" };
            }
            let l: Vec<String> = list.iter().map(u16::to_string).collect();
            s += &format!(",list={}", l.join(","));
            let got = sample(&s).unwrap();
            prop_assert_eq!(got, Sample { path, on, count, list: Some(list), kind: None });
        }

        #[test]
        fn hostile_strings_never_panic(s in ".{0,200}") {
            let _ = sample(&s);
        }

        #[test]
        fn hostile_punctuation_never_panics(s in "[a-z=,]{0,60}") {
            let _ = sample(&s);
        }
    }
}
