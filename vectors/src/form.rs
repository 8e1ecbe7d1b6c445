//! The TOML form of decoded fields, shared by the generator and the tests so both sides of a
//! comparison are built the same way. Integers are TOML integers, booleans booleans, byte strings
//! lowercase hex strings, names/addresses/enum variants plain strings, lists arrays, records
//! tables; an absent optional field is omitted.

use ntm_wire::FieldValue;
use toml::Value;

/// The TOML value of a field, or `None` when the field is absent.
pub fn value(v: &FieldValue) -> Option<Value> {
    Some(match v {
        FieldValue::Int(i) => match i64::try_from(*i) {
            Ok(i) => Value::Integer(i),
            Err(_) => Value::String(format!("{i}")),
        },
        FieldValue::Bool(b) => Value::Boolean(*b),
        FieldValue::Hex(b) => Value::String(hex::encode(b)),
        FieldValue::Text(s) => Value::String(s.clone()),
        FieldValue::List(l) => Value::Array(l.iter().filter_map(value).collect()),
        FieldValue::Absent => return None,
        FieldValue::Record(r) => Value::Table(table(r)),
    })
}

/// A table of named fields (absent ones omitted).
pub fn table(fields: &[(&'static str, FieldValue)]) -> toml::Table {
    fields
        .iter()
        .filter_map(|(k, v)| value(v).map(|v| (k.to_string(), v)))
        .collect()
}
