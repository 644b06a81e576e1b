//! Read planning: merge a profile's fields into as few register reads as possible.
//!
//! Fields are sorted by address and merged while the merged read stays within the
//! profile's `max_registers_per_read` (≤ 125, the Modbus limit) and the unused
//! registers between two fields do not exceed `max_gap_registers` (reading a gap costs
//! two bytes per register; a large gap may also hit addresses the meter rejects).
//! A field's range is its [`span`](crate::profile::Field::span): every register any of
//! its parts needs.

use crate::profile::Profile;
use crate::reading::RegisterAddress;

/// One FC03/FC04 request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    pub start: RegisterAddress,
    pub count: u16,
}

impl ReadRequest {
    fn end(&self) -> u32 {
        u32::from(self.start.0) + u32::from(self.count)
    }
}

/// Plans the reads covering every field of `profile`. A field made of several parts (a
/// combined total's integer part and fraction) is planned as one range spanning all of
/// them, so both parts always come from the same request and cannot tear.
pub fn plan(profile: &Profile) -> Vec<ReadRequest> {
    plan_ranges(
        profile.fields.iter().map(|f| f.span()),
        profile.max_gap_registers,
        profile.max_registers_per_read,
    )
}

/// Plans reads covering `(start, width)` ranges.
pub(crate) fn plan_ranges(
    ranges: impl IntoIterator<Item = (RegisterAddress, u16)>,
    max_gap: u16,
    max_count: u16,
) -> Vec<ReadRequest> {
    let mut ranges: Vec<(RegisterAddress, u16)> = ranges.into_iter().collect();
    ranges.sort();
    let mut out: Vec<ReadRequest> = Vec::new();
    for (start, width) in ranges {
        let end = u32::from(start.0) + u32::from(width);
        if let Some(cur) = out.last_mut() {
            let gap = u32::from(start.0).saturating_sub(cur.end());
            let merged_end = end.max(cur.end());
            let merged_count = merged_end - u32::from(cur.start.0);
            if gap <= u32::from(max_gap) && merged_count <= u32::from(max_count) {
                cur.count = merged_count as u16;
                continue;
            }
        }
        out.push(ReadRequest {
            start,
            count: width,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(a: u16, w: u16) -> (RegisterAddress, u16) {
        (RegisterAddress(a), w)
    }

    #[test]
    fn merges_within_gap_and_splits_beyond() {
        let p = plan_ranges([r(0, 2), r(2, 2), r(10, 2), r(100, 2)], 8, 125);
        assert_eq!(
            p,
            vec![
                ReadRequest {
                    start: RegisterAddress(0),
                    count: 12
                },
                ReadRequest {
                    start: RegisterAddress(100),
                    count: 2
                }
            ]
        );
    }

    #[test]
    fn respects_max_count() {
        let p = plan_ranges((0..100).map(|i| r(i * 2, 2)), 16, 125);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|q| q.count <= 125));
    }

    #[test]
    fn overlapping_bits_share_a_register() {
        let p = plan_ranges([r(5, 1), r(5, 1), r(6, 2)], 0, 125);
        assert_eq!(
            p,
            vec![ReadRequest {
                start: RegisterAddress(5),
                count: 3
            }]
        );
    }

    proptest! {
        #[test]
        fn every_range_is_covered_by_one_request(
            starts in proptest::collection::vec((0u16..2000, 1u16..=4), 1..60),
            gap in 0u16..40,
            max in 4u16..=125,
        ) {
            let ranges: Vec<_> = starts.iter().map(|&(a, w)| r(a, w)).collect();
            let p = plan_ranges(ranges.clone(), gap, max);
            for q in &p {
                prop_assert!(q.count <= max);
            }
            for (a, w) in ranges {
                let covered = p.iter().any(|q| q.start.0 <= a.0 && u32::from(a.0) + u32::from(w) <= q.end());
                prop_assert!(covered, "{:?} not covered by {:?}", (a, w), p);
            }
        }
    }
}
