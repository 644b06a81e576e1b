//! Modbus RTU framing: CRC-16/Modbus, FC03/FC04 requests and their replies.
//!
//! Hand-written rather than taken from tokio-modbus: its RTU client neither drains a
//! late reply after a timeout nor enforces the inter-frame silence, and it cannot tell
//! us where in a noisy input buffer a reply starts. Here a reply is found by
//! [`find_reply`], which scans the received bytes for a frame that fits the request
//! exactly: CRC, unit id, function code (or its exception form `0x80 | fc`) and byte
//! count. Bytes that are not part of such a frame (line noise, a late reply of another
//! unit, DTU heartbeats) are skipped, never decoded. A reply of another unit or to
//! another function is never returned for this request, even if its CRC is valid.
//!
//! The server side ([`parse_request`], [`encode_reply`], [`encode_exception`]) is what
//! the simulator uses to play a bus of meters.
//!
//! Nothing here panics on any input; every length is checked before indexing.

use crate::profile::FunctionCode;
use crate::reading::UnitId;
use crate::source::modbus::ReadRequest;

/// Largest RTU frame (Modbus spec: 256 bytes).
pub(crate) const MAX_FRAME: usize = 256;
/// Bytes of an FC03/FC04 request frame.
pub(crate) const REQUEST_LEN: usize = 8;

/// CRC-16/Modbus (poly 0xA001 reflected, init 0xFFFF). Sent low byte first.
pub(crate) fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn push_crc(frame: &mut Vec<u8>) {
    let crc = crc16(frame);
    frame.extend_from_slice(&crc.to_le_bytes());
}

fn crc_ok(frame: &[u8]) -> bool {
    match frame.len().checked_sub(2) {
        Some(n) if n > 0 => crc16(&frame[..n]).to_le_bytes() == [frame[n], frame[n + 1]],
        _ => false,
    }
}

/// What a reply must match: the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expect {
    pub unit: UnitId,
    pub function: u8,
    pub count: u16,
}

impl Expect {
    pub(crate) fn new(unit: UnitId, function: FunctionCode, req: ReadRequest) -> Self {
        Self {
            unit,
            function: function.code(),
            count: req.count,
        }
    }

    /// Length of a data reply to this request.
    pub(crate) fn reply_len(&self) -> usize {
        5 + 2 * usize::from(self.count)
    }
}

/// Encodes an FC03/FC04 read request.
pub(crate) fn encode_request(unit: UnitId, function: FunctionCode, req: ReadRequest) -> Vec<u8> {
    encode_raw_request(unit.0, function.code(), req.start.0, req.count)
}

fn encode_raw_request(unit: u8, function: u8, a: u16, b: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(REQUEST_LEN);
    f.push(unit);
    f.push(function);
    f.extend_from_slice(&a.to_be_bytes());
    f.extend_from_slice(&b.to_be_bytes());
    push_crc(&mut f);
    f
}

/// A reply that fits the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Registers(Vec<u16>),
    /// The device's exception code (`0x02` illegal data address, `0x06` busy, …).
    Exception(u8),
}

/// The outcome of scanning received bytes for the reply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scan {
    /// The reply was found; `skipped` bytes before it were not part of it.
    Found {
        reply: Reply,
        skipped: usize,
        end: usize,
    },
    /// No reply (yet): keep reading until the deadline.
    Incomplete,
}

/// Scans `buf` for the first frame answering `expect`.
///
/// A candidate starts where the unit id and function code (plain or exception) match;
/// it is accepted only with a valid CRC and, for data, the exact byte count. A
/// candidate that fails is skipped and the scan goes on, so noise before a reply does
/// not hide it. `Incomplete` means some candidate is still too short to judge.
pub(crate) fn find_reply(buf: &[u8], expect: &Expect) -> Scan {
    let exc = expect.function | 0x80;
    for i in 0..buf.len() {
        if buf[i] != expect.unit.0 {
            continue;
        }
        let Some(&fc) = buf.get(i + 1) else {
            continue;
        };
        let rest = &buf[i..];
        if fc == exc {
            if rest.len() >= 5 && crc_ok(&rest[..5]) {
                return Scan::Found {
                    reply: Reply::Exception(rest[2]),
                    skipped: i,
                    end: i + 5,
                };
            }
        } else if fc == expect.function {
            let len = expect.reply_len();
            let Some(&byte_count) = rest.get(2) else {
                continue;
            };
            if usize::from(byte_count) != 2 * usize::from(expect.count) {
                continue;
            }
            if rest.len() >= len && crc_ok(&rest[..len]) {
                let words = rest[3..len - 2]
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                return Scan::Found {
                    reply: Reply::Registers(words),
                    skipped: i,
                    end: i + len,
                };
            }
        }
    }
    Scan::Incomplete
}

/// A request as the simulated server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerRequest {
    pub unit: u8,
    pub function: u8,
    pub start: u16,
    pub count: u16,
}

/// Server side: scans `buf` for an 8-byte request frame with a valid CRC (functions
/// 1..=6 all have this shape). Returns the request and the bytes consumed, or the
/// number of leading bytes that can be discarded as noise when no request is found.
pub(crate) fn parse_request(buf: &[u8]) -> Result<(ServerRequest, usize), usize> {
    for i in 0..buf.len() {
        let Some(f) = buf.get(i..i + REQUEST_LEN) else {
            return Err(i);
        };
        if (1..=6).contains(&f[1]) && crc_ok(f) {
            return Ok((
                ServerRequest {
                    unit: f[0],
                    function: f[1],
                    start: u16::from_be_bytes([f[2], f[3]]),
                    count: u16::from_be_bytes([f[4], f[5]]),
                },
                i + REQUEST_LEN,
            ));
        }
    }
    Err(buf.len())
}

/// Server side: a data reply for FC03/FC04.
pub(crate) fn encode_reply(unit: u8, function: u8, words: &[u16]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + 2 * words.len());
    f.push(unit);
    f.push(function);
    f.push(u8::try_from(2 * words.len()).unwrap_or(u8::MAX));
    for w in words {
        f.extend_from_slice(&w.to_be_bytes());
    }
    push_crc(&mut f);
    f
}

/// Server side: an exception reply.
pub(crate) fn encode_exception(unit: u8, function: u8, code: u8) -> Vec<u8> {
    let mut f = vec![unit, function | 0x80, code];
    push_crc(&mut f);
    f
}

/// Encodes any 8-byte request (for tests).
#[cfg(test)]
pub(crate) fn encode_any_request(unit: u8, function: u8, start: u16, count: u16) -> Vec<u8> {
    encode_raw_request(unit, function, start, count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::RegisterAddress;
    use proptest::prelude::*;

    fn req(start: u16, count: u16) -> ReadRequest {
        ReadRequest {
            start: RegisterAddress(start),
            count,
        }
    }

    #[test]
    fn crc_matches_the_spec_example() {
        // Modbus over serial line spec, 6.2.2 example: 02 07 → CRC 0x1241 (sent 41 12).
        assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
        let f = encode_request(UnitId(1), FunctionCode::ReadHolding, req(0, 10));
        assert_eq!(f, [0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD]);
    }

    #[test]
    fn finds_a_reply_behind_noise_and_in_pieces() {
        let e = Expect::new(UnitId(7), FunctionCode::ReadInput, req(0, 2));
        let reply = encode_reply(7, 4, &[0x1234, 0xABCD]);
        let mut buf = vec![0xFF, 0x07, 0x00, 0x55];
        for (n, b) in reply.iter().enumerate() {
            buf.push(*b);
            let scan = find_reply(&buf, &e);
            if n + 1 < reply.len() {
                assert_eq!(scan, Scan::Incomplete, "after {} bytes", n + 1);
            } else {
                assert_eq!(
                    scan,
                    Scan::Found {
                        reply: Reply::Registers(vec![0x1234, 0xABCD]),
                        skipped: 4,
                        end: buf.len()
                    }
                );
            }
        }
    }

    #[test]
    fn rejects_other_units_functions_counts_and_bad_crc() {
        let e = Expect::new(UnitId(7), FunctionCode::ReadInput, req(0, 2));
        for bad in [
            encode_reply(8, 4, &[1, 2]),
            encode_reply(7, 3, &[1, 2]),
            encode_reply(7, 4, &[1, 2, 3]),
            encode_exception(7, 3, 2),
        ] {
            assert!(
                !matches!(find_reply(&bad, &e), Scan::Found { .. }),
                "{bad:02x?}"
            );
        }
        let mut corrupt = encode_reply(7, 4, &[1, 2]);
        corrupt[4] ^= 0x10;
        assert!(!matches!(find_reply(&corrupt, &e), Scan::Found { .. }));
        let exc = encode_exception(7, 4, 6);
        assert_eq!(
            find_reply(&exc, &e),
            Scan::Found {
                reply: Reply::Exception(6),
                skipped: 0,
                end: 5
            }
        );
    }

    #[test]
    fn server_parses_requests_behind_noise() {
        let mut buf = vec![0x00, 0x13];
        buf.extend(encode_request(
            UnitId(3),
            FunctionCode::ReadHolding,
            req(0x100, 4),
        ));
        let (r, used) = parse_request(&buf).unwrap();
        assert_eq!(
            r,
            ServerRequest {
                unit: 3,
                function: 3,
                start: 0x100,
                count: 4
            }
        );
        assert_eq!(used, buf.len());
        assert_eq!(parse_request(&buf[..5]), Err(0));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            unit in 1u8..=247,
            count in 1u16..=125,
        ) {
            let e = Expect { unit: UnitId(unit), function: 3, count };
            let _ = find_reply(&bytes, &e);
            let _ = parse_request(&bytes);
        }

        #[test]
        fn single_byte_corruption_is_never_misattributed(
            words in proptest::collection::vec(any::<u16>(), 1..=20),
            unit in 1u8..=247,
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let count = words.len() as u16;
            let fc = 4u8;
            let mut frame = encode_reply(unit, fc, &words);
            let i = at.index(frame.len());
            frame[i] ^= xor;
            // Whoever we expect, a corrupted frame is either rejected or, if it still
            // checks out, it is the very unit/function/count it claims to be.
            for expect_unit in [unit, unit.wrapping_add(1).max(1)] {
                for function in [3u8, 4] {
                    let e = Expect { unit: UnitId(expect_unit), function, count };
                    if let Scan::Found { reply, skipped, end } = find_reply(&frame, &e) {
                        let f = &frame[skipped..end];
                        prop_assert_eq!(f[0], expect_unit);
                        prop_assert!(f[1] == function || f[1] == function | 0x80);
                        prop_assert!(crc_ok(f));
                        if let Reply::Registers(w) = reply {
                            prop_assert_eq!(w.len(), words.len());
                        }
                        // A single-byte error is always caught by CRC-16 when it hits the
                        // frame actually accepted.
                        prop_assert!(skipped > 0 || end < frame.len() || i >= frame.len());
                    }
                }
            }
        }
    }
}
