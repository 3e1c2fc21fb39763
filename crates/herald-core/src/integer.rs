//! Integer parameters. JSON does not tell `2` from `2.0`, and neither does the OpenAPI
//! document's `"type": "integer"`, so a number with no fractional part is accepted in either
//! spelling; a fraction, or a value outside the field's type (`format: int64`, `uint64`, …, the
//! document's `minimum`/`maximum`), is HTTP 400 like any other wrong type.
//!
//! Shared by every API that decodes JSON numbers (the server API, push requests).
//!
//! May touch: nothing.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Error, Unexpected, Visitor};
use serde::{Deserialize, Deserializer};

/// An integer type a parameter may have, with its range.
pub trait Integer: Sized + TryFrom<i128> {
    const MIN: i128;
    const MAX: i128;
}

macro_rules! integer {
    ($($t:ty),*) => {$(
        impl Integer for $t {
            const MIN: i128 = <$t>::MIN as i128;
            const MAX: i128 = <$t>::MAX as i128;
        }
    )*};
}
integer!(u16, u32, u64, i64, usize);

struct IntegerVisitor<T>(PhantomData<T>);

impl<T: Integer> IntegerVisitor<T> {
    fn in_range<E: Error>(&self, value: i128, unexpected: Unexpected<'_>) -> Result<T, E> {
        T::try_from(value).map_err(|_| E::invalid_value(unexpected, self))
    }
}

impl<T: Integer> Visitor<'_> for IntegerVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an integer from {} to {}", T::MIN, T::MAX)
    }

    fn visit_i64<E: Error>(self, value: i64) -> Result<T, E> {
        self.in_range(value.into(), Unexpected::Signed(value))
    }

    fn visit_u64<E: Error>(self, value: u64) -> Result<T, E> {
        self.in_range(value.into(), Unexpected::Unsigned(value))
    }

    fn visit_f64<E: Error>(self, value: f64) -> Result<T, E> {
        let unexpected = Unexpected::Float(value);
        // Integral and inside i128 (2^127), so the cast below is exact.
        if value.fract() != 0.0 || !value.is_finite() || value.abs() >= 1.7e38 {
            return Err(E::invalid_value(unexpected, &self));
        }
        self.in_range(value as i128, unexpected)
    }
}

struct Int<T>(T);

impl<'de, T: Integer> Deserialize<'de> for Int<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(IntegerVisitor(PhantomData))
            .map(Int)
    }
}

/// For `#[serde(deserialize_with = "integer::required")]`.
pub fn required<'de, D: Deserializer<'de>, T: Integer>(deserializer: D) -> Result<T, D::Error> {
    Int::deserialize(deserializer).map(|Int(value)| value)
}

/// For `#[serde(default, deserialize_with = "integer::optional")]`: `null` is absent.
pub fn optional<'de, D: Deserializer<'de>, T: Integer>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    Option::<Int<T>>::deserialize(deserializer).map(|value| value.map(|Int(value)| value))
}
