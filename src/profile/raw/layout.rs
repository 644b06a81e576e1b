//! Register layout checks of a field: the fraction part of a combined total, and
//! overlaps between fields (every part of each, bits of one status word excepted).

use super::{Check, RawField};
use crate::profile::{Field, FieldType, Fraction};
use crate::reading::RegisterAddress;

/// The fraction part of a combined total, if the field has one.
pub(super) fn convert_fraction(
    c: &mut Check<'_>,
    key: &str,
    f: &RawField,
    ty: Option<FieldType>,
    address: Option<RegisterAddress>,
    address_base: u16,
) -> Option<Fraction> {
    let Some(reg) = &f.fraction_register else {
        if let Some(t) = &f.fraction_type {
            c.err(
                t.span(),
                format!("{key}.fraction_type"),
                "fraction_type needs fraction_register".into(),
            );
        }
        return None;
    };
    if ty.is_some_and(|t| !t.is_integer()) {
        c.err(
            f.ty.span(),
            format!("{key}.type"),
            format!(
                "the integer part of a combined total must be an integer type, not {:?}; valid: \"u16\", \"i16\", \"u32\", \"i32\", \"u64\", \"i64\"",
                f.ty.get_ref()
            ),
        );
    }
    let frac_ty = match &f.fraction_type {
        None => Some(FieldType::F32),
        Some(t) => match FieldType::parse(t.get_ref(), None) {
            Some(FieldType::Bit(_)) | None => {
                c.err(
                    t.span(),
                    format!("{key}.fraction_type"),
                    format!(
                        "fraction type {:?} is not valid; valid: \"f32\", \"f64\" or an integer type",
                        t.get_ref()
                    ),
                );
                None
            }
            Some(t) => Some(t),
        },
    }?;
    let register = *reg.get_ref();
    let words = u32::from(frac_ty.words());
    let Some(wire) = register
        .checked_sub(u32::from(address_base))
        .filter(|w| w + words <= 0x1_0000)
    else {
        c.err(
            reg.span(),
            format!("{key}.fraction_register"),
            format!(
                "register {register} with address_base {address_base} and width {words} is outside 0..=65535 on the wire"
            ),
        );
        return None;
    };
    let frac_addr = RegisterAddress(wire as u16);
    if let (Some(a), Some(t)) = (address, ty) {
        let (a0, a1) = (u32::from(a.0), u32::from(a.0) + u32::from(t.words()));
        if wire < a1 && a0 < wire + words {
            c.err(
                reg.span(),
                format!("{key}.fraction_register"),
                format!(
                    "fraction registers {register}..{} overlap the integer part (registers {}..{})",
                    register + words,
                    f.register.get_ref(),
                    u64::from(*f.register.get_ref()) + u64::from(t.words())
                ),
            );
            return None;
        }
    }
    Some(Fraction {
        register,
        address: frac_addr,
        ty: frac_ty,
    })
}

/// Which part of a field a conflict is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    Integer,
    Fraction,
}

/// Why two fields may not coexist, if they may not, and which part of `a` collides.
/// Every part of each field (a combined total's fraction too) is compared.
pub(super) fn conflict(a: &Field, b: &Field) -> Option<(Part, String)> {
    if a.name == b.name {
        return Some((
            Part::Integer,
            format!("field name `{}` is used twice", a.name),
        ));
    }
    let reg_a = std::iter::once((Part::Integer, a.register, a.address, a.ty)).chain(
        a.fraction
            .map(|f| (Part::Fraction, f.register, f.address, f.ty)),
    );
    for (part, register, addr, ty) in reg_a {
        let (a0, a1) = (u32::from(addr.0), u32::from(addr.0) + u32::from(ty.words()));
        let reg_b = std::iter::once((b.register, b.address, b.ty))
            .chain(b.fraction.map(|f| (f.register, f.address, f.ty)));
        for (b_register, b_addr, b_ty) in reg_b {
            let (b0, b1) = (
                u32::from(b_addr.0),
                u32::from(b_addr.0) + u32::from(b_ty.words()),
            );
            if a0 >= b1 || b0 >= a1 {
                continue;
            }
            let msg = match (ty, b_ty) {
                (FieldType::Bit(x), FieldType::Bit(y)) if x == y => format!(
                    "bit {x} of register {register} is already field `{}`",
                    b.name
                ),
                (FieldType::Bit(_), _) | (_, FieldType::Bit(_)) => continue,
                _ => format!(
                    "registers {register}..{} overlap field `{}` ({b_ty} at register {b_register})",
                    register + u32::from(ty.words()),
                    b.name,
                ),
            };
            return Some((part, msg));
        }
    }
    None
}
