//! The envelope framing: header encode/parse, whole-envelope parsing without crypto, and the
//! [`SealedBatch`] that carries envelope bytes through the store and the uplink.
//!
//! The byte layout is specified in the `seal` module docs; this file is its only codec. Parsing
//! reads untrusted bytes (from the disk, the broker, the network) through a bounds-checked cursor:
//! every read is `slice::get`, every length is checked before use, so malformed input becomes an
//! [`OpenError`] and never a panic or an out-of-range allocation. Parsing checks the framing
//! only (magic, version, suite, gateway id syntax, stream code, lengths); signatures and
//! decryption are the [`Opener`](super::Opener)'s job.

use crate::reading::{GatewayId, PurposeName, Stream};

use super::error::OpenError;

/// The first four bytes of every envelope.
pub(crate) const MAGIC: [u8; 4] = *b"CGB1";
/// The envelope format version this code writes.
pub(crate) const VERSION: u8 = 3;
/// The version before records carried an aggregate window and a key epoch; still read (its
/// records as `window: None, epoch: 0`).
pub(crate) const VERSION_2: u8 = 2;
/// The version before the store incarnation was carried; still read (as incarnation 0).
pub(crate) const VERSION_1: u8 = 1;
/// Most records one envelope may carry: openers reject a larger `record_count` before
/// decrypting, and the gateway's `batch.max_records` may not exceed it.
pub const MAX_RECORDS_PER_BATCH: u32 = 50_000;
/// Suite 1: HPKE base mode with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305;
/// Ed25519 signatures.
pub(crate) const SUITE_X25519_CHACHA20POLY1305_ED25519: u8 = 1;
/// The gateway id field holds 1..=64 bytes.
pub(crate) const MAX_GATEWAY_LEN: usize = 64;
/// The purpose name field (version 3) holds 1..=64 bytes.
pub(crate) const MAX_PURPOSE_LEN: usize = 64;
/// Length of the trailing Ed25519 signature.
pub(crate) const SIGNATURE_LEN: usize = 64;
/// Length of the HPKE encapsulated key (an X25519 public key).
pub(crate) const ENCAPPED_KEY_LEN: usize = 32;

/// Bytes of a version 2 header besides the gateway id: magic, version, suite, gateway_len,
/// stream, incarnation, seq, created_at, record_count, policy_hash, both key ids, enc.
const HEADER_FIXED_LEN_V2: usize =
    4 + 1 + 1 + 1 + 1 + 8 + 8 + 8 + 4 + 32 + 8 + 8 + ENCAPPED_KEY_LEN;
/// Version 3 adds purpose_len (and the purpose name itself).
const HEADER_FIXED_LEN: usize = HEADER_FIXED_LEN_V2 + 1;
/// Version 1 headers have no incarnation.
const HEADER_FIXED_LEN_V1: usize = HEADER_FIXED_LEN_V2 - 8;

/// The envelope header: everything from magic through the encapsulated key. Its exact bytes are
/// the AEAD associated data, so every field is authenticated by the AEAD and by the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Envelope format version ([`VERSION`]).
    pub version: u8,
    /// Cipher suite id ([`SUITE_X25519_CHACHA20POLY1305_ED25519`]).
    pub suite: u8,
    pub gateway: GatewayId,
    pub stream: Stream,
    /// The purpose the records were produced for; always set in version 3, `None` in versions
    /// 1 and 2, which did not carry it.
    pub purpose: Option<PurposeName>,
    /// The gateway store's incarnation: sequence numbers count within it. 0 in version 1
    /// envelopes, which did not carry it.
    pub incarnation: u64,
    /// Per-stream sequence number at the gateway, within the incarnation.
    pub seq: u64,
    /// When the batch was sealed, ms since the Unix epoch, UTC.
    pub created_at_ms: i64,
    pub record_count: u32,
    /// Hash of the policy the records were produced under (for `purpose`).
    pub policy_hash: [u8; 32],
    /// Key id of the gateway's Ed25519 verifying key.
    pub signer_key_id: [u8; 8],
    /// Key id of the hub's X25519 HPKE public key.
    pub recipient_key_id: [u8; 8],
    /// HPKE `enc`: the sender's ephemeral X25519 public key.
    pub encapped_key: [u8; ENCAPPED_KEY_LEN],
}

impl Header {
    /// Length of this header on the wire.
    pub(crate) fn encoded_len(&self) -> usize {
        let fixed = match self.version {
            VERSION_1 => HEADER_FIXED_LEN_V1,
            VERSION_2 => HEADER_FIXED_LEN_V2,
            _ => HEADER_FIXED_LEN + self.purpose.as_ref().map_or(0, |p| p.as_str().len()),
        };
        fixed + self.gateway.as_str().len()
    }

    /// Appends the header bytes (magic through enc) to `out`, in the layout of `self.version`
    /// (a version 1 header has no incarnation, versions 1 and 2 have no purpose).
    ///
    /// # Panics
    ///
    /// If a version 3 header has no purpose (the sealer always sets one).
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        let gateway = self.gateway.as_str().as_bytes();
        let gateway_len =
            u8::try_from(gateway.len()).expect("invariant: GatewayId is at most 64 bytes");
        out.reserve(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.push(self.version);
        out.push(self.suite);
        out.push(gateway_len);
        out.extend_from_slice(gateway);
        out.push(self.stream.code());
        if self.version >= VERSION {
            let purpose = self
                .purpose
                .as_ref()
                .expect("invariant: a version 3 header names its purpose")
                .as_str()
                .as_bytes();
            let purpose_len =
                u8::try_from(purpose.len()).expect("invariant: PurposeName is at most 64 bytes");
            out.push(purpose_len);
            out.extend_from_slice(purpose);
        }
        if self.version != VERSION_1 {
            out.extend_from_slice(&self.incarnation.to_be_bytes());
        }
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.created_at_ms.to_be_bytes());
        out.extend_from_slice(&self.record_count.to_be_bytes());
        out.extend_from_slice(&self.policy_hash);
        out.extend_from_slice(&self.signer_key_id);
        out.extend_from_slice(&self.recipient_key_id);
        out.extend_from_slice(&self.encapped_key);
    }

    /// The header bytes (magic through enc).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Parses a header from the start of `bytes`; returns it and the number of bytes it used.
    /// Checks magic, version, suite, gateway id, stream code, purpose name and record count, in
    /// that order.
    pub(crate) fn parse(bytes: &[u8]) -> Result<(Header, usize), OpenError> {
        let mut r = Cursor::new(bytes);
        if r.array::<4>()? != MAGIC {
            return Err(OpenError::BadMagic);
        }
        let version = r.u8()?;
        if !matches!(version, VERSION | VERSION_2 | VERSION_1) {
            return Err(OpenError::UnknownVersion(version));
        }
        let suite = r.u8()?;
        if suite != SUITE_X25519_CHACHA20POLY1305_ED25519 {
            return Err(OpenError::UnknownSuite(suite));
        }
        let gateway_len = usize::from(r.u8()?);
        if gateway_len == 0 || gateway_len > MAX_GATEWAY_LEN {
            return Err(OpenError::BadGatewayId(format!(
                "length {gateway_len} is outside 1..={MAX_GATEWAY_LEN}"
            )));
        }
        let gateway = std::str::from_utf8(r.take(gateway_len)?)
            .map_err(|_| OpenError::BadGatewayId("not UTF-8".to_owned()))?;
        let gateway =
            GatewayId::new(gateway).map_err(|e| OpenError::BadGatewayId(e.to_string()))?;
        let stream_code = r.u8()?;
        let stream = Stream::from_code(stream_code).ok_or(OpenError::UnknownStream(stream_code))?;
        let purpose = if version >= VERSION {
            Some(parse_purpose(&mut r)?)
        } else {
            None
        };
        let incarnation = if version == VERSION_1 {
            0
        } else {
            u64::from_be_bytes(r.array()?)
        };
        let header = Header {
            version,
            suite,
            gateway,
            stream,
            purpose,
            incarnation,
            seq: u64::from_be_bytes(r.array()?),
            created_at_ms: i64::from_be_bytes(r.array()?),
            record_count: u32::from_be_bytes(r.array()?),
            policy_hash: r.array()?,
            signer_key_id: r.array()?,
            recipient_key_id: r.array()?,
            encapped_key: r.array()?,
        };
        if header.record_count > MAX_RECORDS_PER_BATCH {
            return Err(OpenError::TooManyRecords {
                count: header.record_count,
                limit: MAX_RECORDS_PER_BATCH,
            });
        }
        Ok((header, r.pos))
    }
}

fn parse_purpose(r: &mut Cursor<'_>) -> Result<PurposeName, OpenError> {
    let len = usize::from(r.u8()?);
    if len == 0 || len > MAX_PURPOSE_LEN {
        return Err(OpenError::BadPurpose(format!(
            "length {len} is outside 1..={MAX_PURPOSE_LEN}"
        )));
    }
    let purpose = std::str::from_utf8(r.take(len)?)
        .map_err(|_| OpenError::BadPurpose("not UTF-8".to_owned()))?;
    PurposeName::new(purpose).map_err(|e| OpenError::BadPurpose(e.to_string()))
}

/// A parsed envelope whose slices borrow the input. Nothing in it has been verified.
#[derive(Debug)]
pub(crate) struct Frame<'a> {
    pub header: Header,
    /// Magic through enc: the AEAD associated data.
    pub header_bytes: &'a [u8],
    /// The HPKE ciphertext, AEAD tag included.
    pub ciphertext: &'a [u8],
    /// Every byte before the signature: what the signature covers.
    pub signed: &'a [u8],
    pub signature: [u8; SIGNATURE_LEN],
}

/// Splits a whole envelope into its parts. The envelope must end exactly after the signature.
pub(crate) fn parse_frame(bytes: &[u8]) -> Result<Frame<'_>, OpenError> {
    let (header, header_len) = Header::parse(bytes)?;
    let mut r = Cursor::new(bytes);
    let header_bytes = r.take(header_len)?;
    let ct_len =
        usize::try_from(u32::from_be_bytes(r.array()?)).map_err(|_| OpenError::Truncated)?;
    let ciphertext = r.take(ct_len)?;
    let signed_len = r.pos;
    let signature = r.array::<SIGNATURE_LEN>()?;
    let extra = bytes.len().saturating_sub(r.pos);
    if extra != 0 {
        return Err(OpenError::TrailingBytes { extra });
    }
    let signed = bytes.get(..signed_len).ok_or(OpenError::Truncated)?;
    Ok(Frame {
        header,
        header_bytes,
        ciphertext,
        signed,
        signature,
    })
}

/// Parses an envelope's header and checks its framing, without any key: for the store and the
/// uplink, which handle envelopes they cannot (and must not) open.
#[cfg(test)]
pub(crate) fn peek_header(bytes: &[u8]) -> Result<Header, OpenError> {
    parse_frame(bytes).map(|frame| frame.header)
}

/// A sealed batch: the whole envelope, as stored and published, with the two header fields the
/// store keys it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBatch {
    pub stream: Stream,
    pub seq: u64,
    /// The complete envelope, magic through signature; empty for a lone checkpoint.
    pub bytes: Vec<u8>,
    /// The pipeline's checkpoint to store with this batch in one atomic write (see
    /// `pipeline::checkpoint`).
    pub checkpoint: Option<Vec<u8>>,
}

impl SealedBatch {
    /// A checkpoint with no batch: stored after every batch sent to the store before it.
    pub fn checkpoint_only(checkpoint: Vec<u8>) -> SealedBatch {
        SealedBatch {
            stream: Stream::Audit,
            seq: 0,
            bytes: Vec::new(),
            checkpoint: Some(checkpoint),
        }
    }

    /// Whether this is a lone checkpoint ([`SealedBatch::checkpoint_only`]): an envelope is
    /// never empty.
    pub fn is_checkpoint_only(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A bounds-checked reader over untrusted bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], OpenError> {
        let end = self.pos.checked_add(n).ok_or(OpenError::Truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or(OpenError::Truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], OpenError> {
        let slice = self.take(N)?;
        <[u8; N]>::try_from(slice).map_err(|_| OpenError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, OpenError> {
        let [b] = self.array::<1>()?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            version: VERSION,
            suite: SUITE_X25519_CHACHA20POLY1305_ED25519,
            gateway: GatewayId::new("gw-1").unwrap(),
            stream: Stream::Alarms,
            purpose: Some(PurposeName::new("billing").unwrap()),
            incarnation: 0x1112_1314_1516_1718,
            seq: 0x0102_0304_0506_0708,
            created_at_ms: -2,
            record_count: 7,
            policy_hash: [0xaa; 32],
            signer_key_id: [0xbb; 8],
            recipient_key_id: [0xcc; 8],
            encapped_key: [0xdd; 32],
        }
    }

    /// Issue 11 item 2: a version 3 header names the purpose beside the policy hash.
    #[test]
    fn header_round_trips_and_has_documented_layout() {
        let h = header();
        let bytes = h.encode();
        assert_eq!(bytes.len(), h.encoded_len());
        assert_eq!(bytes.len(), 117 + 4 + 7);
        assert_eq!(&bytes[..8], b"CGB1\x03\x01\x04g");
        assert_eq!(&bytes[7..11], b"gw-1");
        assert_eq!(bytes[11], 1, "stream code of alarms");
        assert_eq!(bytes[12], 7, "purpose length");
        assert_eq!(&bytes[13..20], b"billing");
        assert_eq!(
            &bytes[20..28],
            &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18],
            "incarnation is big-endian"
        );
        assert_eq!(
            &bytes[28..36],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            "seq is big-endian"
        );
        assert_eq!(
            &bytes[36..44],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]
        );
        assert_eq!(&bytes[44..48], &[0, 0, 0, 7]);
        assert_eq!(&bytes[48..80], &[0xaa; 32], "policy hash");
        assert_eq!(Header::parse(&bytes), Ok((h, bytes.len())));
    }

    #[test]
    fn a_version_2_header_has_no_purpose() {
        let h = Header {
            version: VERSION_2,
            purpose: None,
            ..header()
        };
        let bytes = h.encode();
        assert_eq!(bytes.len(), 116 + 4);
        assert_eq!(&bytes[..8], b"CGB1\x02\x01\x04g");
        assert_eq!(
            &bytes[12..20],
            &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18],
            "incarnation follows the stream"
        );
        assert_eq!(Header::parse(&bytes), Ok((h, bytes.len())));
    }

    #[test]
    fn a_version_1_header_has_no_incarnation_and_reads_as_incarnation_0() {
        let h = Header {
            version: VERSION_1,
            purpose: None,
            incarnation: 0,
            ..header()
        };
        let bytes = h.encode();
        assert_eq!(bytes.len(), 108 + 4);
        assert_eq!(&bytes[..8], b"CGB1\x01\x01\x04g");
        assert_eq!(
            &bytes[12..20],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            "seq follows the stream"
        );
        assert_eq!(Header::parse(&bytes), Ok((h, bytes.len())));
    }

    /// Issue 9 item 15: a header announcing more records than any gateway may send is refused
    /// while parsing, before a key is used.
    #[test]
    fn a_record_count_above_the_ceiling_is_refused_while_parsing() {
        let mut h = header();
        h.record_count = MAX_RECORDS_PER_BATCH;
        assert!(Header::parse(&h.encode()).is_ok());
        h.record_count = 600_000;
        assert_eq!(
            Header::parse(&h.encode()),
            Err(OpenError::TooManyRecords {
                count: 600_000,
                limit: MAX_RECORDS_PER_BATCH
            })
        );
    }

    #[test]
    fn header_parse_rejects_bad_fields() {
        let good = header().encode();
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] = b;
            Header::parse(&v).map(|_| ())
        };
        assert_eq!(with(0, b'X'), Err(OpenError::BadMagic));
        assert_eq!(with(4, 4), Err(OpenError::UnknownVersion(4)));
        assert_eq!(with(4, 0), Err(OpenError::UnknownVersion(0)));
        assert_eq!(with(5, 9), Err(OpenError::UnknownSuite(9)));
        assert!(matches!(with(6, 0), Err(OpenError::BadGatewayId(_))));
        assert!(matches!(with(6, 65), Err(OpenError::BadGatewayId(_))));
        assert!(matches!(with(7, b'/'), Err(OpenError::BadGatewayId(_))));
        assert!(matches!(with(7, 0xff), Err(OpenError::BadGatewayId(_))));
        assert_eq!(with(11, 200), Err(OpenError::UnknownStream(200)));
        assert!(matches!(with(12, 0), Err(OpenError::BadPurpose(_))));
        assert!(matches!(with(12, 65), Err(OpenError::BadPurpose(_))));
        assert!(matches!(with(13, b' '), Err(OpenError::BadPurpose(_))));
        assert!(matches!(with(13, 0xc3), Err(OpenError::BadPurpose(_))));
        for len in 0..good.len() {
            assert_eq!(
                Header::parse(&good[..len]).map(|_| ()),
                Err(OpenError::Truncated)
            );
        }
    }

    #[test]
    fn frame_requires_exact_length() {
        let mut env = header().encode();
        env.extend_from_slice(&3u32.to_be_bytes());
        env.extend_from_slice(b"abc");
        env.extend_from_slice(&[0x55; SIGNATURE_LEN]);
        let frame = parse_frame(&env).unwrap();
        assert_eq!(frame.ciphertext, b"abc");
        assert_eq!(frame.signed.len(), env.len() - SIGNATURE_LEN);
        assert_eq!(frame.header_bytes, &header().encode()[..]);
        env.push(0);
        assert_eq!(
            parse_frame(&env).map(|_| ()),
            Err(OpenError::TrailingBytes { extra: 1 })
        );
    }
}
