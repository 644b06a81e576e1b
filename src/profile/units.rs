//! Units a profile may name, and their exact conversion into canonical units.
//!
//! A profile states the unit of a field's engineering value (after `scale` and
//! `offset`); normalisation multiplies by the factor here to reach the canonical
//! [`Unit`]. The table is closed: a unit not listed is a profile error that lists
//! the valid ones.

use crate::reading::Unit;

/// (symbol in profiles, canonical unit, factor to canonical)
const TABLE: &[(&str, Unit, f64)] = &[
    ("W", Unit::Watt, 1.0),
    ("kW", Unit::Watt, 1e3),
    ("MW", Unit::Watt, 1e6),
    ("Wh", Unit::WattHour, 1.0),
    ("kWh", Unit::WattHour, 1e3),
    ("MWh", Unit::WattHour, 1e6),
    ("var", Unit::Var, 1.0),
    ("kvar", Unit::Var, 1e3),
    ("varh", Unit::VarHour, 1.0),
    ("kvarh", Unit::VarHour, 1e3),
    ("VA", Unit::VoltAmpere, 1.0),
    ("kVA", Unit::VoltAmpere, 1e3),
    ("V", Unit::Volt, 1.0),
    ("kV", Unit::Volt, 1e3),
    ("A", Unit::Ampere, 1.0),
    ("mA", Unit::Ampere, 1e-3),
    ("Hz", Unit::Hertz, 1.0),
    ("m3", Unit::CubicMetre, 1.0),
    ("L", Unit::CubicMetre, 1e-3),
    ("m3/h", Unit::CubicMetrePerHour, 1.0),
    ("L/h", Unit::CubicMetrePerHour, 1e-3),
    ("L/s", Unit::CubicMetrePerHour, 3.6),
    ("degC", Unit::Celsius, 1.0),
    ("%", Unit::Percent, 1.0),
    ("Pa", Unit::Pascal, 1.0),
    ("kPa", Unit::Pascal, 1e3),
    ("MPa", Unit::Pascal, 1e6),
    ("bar", Unit::Pascal, 1e5),
    ("s", Unit::Second, 1.0),
    ("1", Unit::One, 1.0),
];

/// A profile unit: its symbol, the canonical unit and the exact factor between them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProfileUnit {
    pub symbol: &'static str,
    pub canonical: Unit,
    pub factor: f64,
}

impl ProfileUnit {
    pub(crate) fn parse(symbol: &str) -> Option<Self> {
        TABLE
            .iter()
            .find(|(s, _, _)| *s == symbol)
            .map(|&(symbol, canonical, factor)| Self {
                symbol,
                canonical,
                factor,
            })
    }

    /// The symbols a profile may use, for error messages.
    pub(crate) fn valid_symbols() -> String {
        TABLE
            .iter()
            .map(|(s, _, _)| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_canonical_unit_is_reachable_with_factor_one() {
        for u in Unit::ALL {
            let p = ProfileUnit::parse(u.symbol()).expect("canonical symbol is a profile unit");
            assert_eq!(p.canonical, u);
            assert_eq!(p.factor, 1.0);
        }
    }

    #[test]
    fn kilo_units_convert() {
        let kw = ProfileUnit::parse("kW").unwrap();
        assert_eq!((kw.canonical, kw.factor), (Unit::Watt, 1000.0));
        assert!(ProfileUnit::parse("furlong").is_none());
        assert!(ProfileUnit::valid_symbols().contains("\"kWh\""));
    }
}
