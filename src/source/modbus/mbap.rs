//! Modbus TCP framing (MBAP) for one read at a time: [`MbapClient`].
//!
//! Written here rather than taken from tokio-modbus's client because of one rule the
//! library cannot express: a reply whose transaction id is not the one of the request in
//! flight is a stale copy (a serial server or DTU that repeats replies, a reply that
//! arrived after its request was given up) and is read past, counted in
//! `modbus_stale_replies`, while the reader keeps waiting for its own reply. tokio-modbus
//! fails the call with a header mismatch instead, so a device whose replies arrive twice
//! never had a clean poll (issue 9 item 12).
//!
//! Everything else that does not fit the request (protocol id, unit, function, byte
//! count) is a [`PollError::BadFrame`]; a length field outside what Modbus allows ends
//! the frame sync, and the caller drops the connection (TCP does not discard late
//! replies itself, see [`Transact::DISCARDS_LATE_REPLIES`](crate::source::poll::Transact)).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};
use tracing::debug;

use super::ReadRequest;
use crate::profile::FunctionCode;
use crate::reading::UnitId;
use crate::source::poll::PollError;
use crate::telemetry::Metrics;

/// MBAP header: transaction id, protocol id, length, unit id.
const HEADER_LEN: usize = 7;
/// Largest PDU Modbus allows (function code and 252 bytes).
const MAX_PDU: usize = 253;

/// One Modbus TCP connection, one transaction at a time.
pub(crate) struct MbapClient<S> {
    stream: S,
    next_tid: u16,
    metrics: Arc<Metrics>,
}

impl<S> std::fmt::Debug for MbapClient<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MbapClient")
            .field("next_tid", &self.next_tid)
            .finish_non_exhaustive()
    }
}

/// A received frame.
struct Frame {
    tid: u16,
    unit: u8,
    pdu: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> MbapClient<S> {
    pub(crate) fn new(stream: S, metrics: Arc<Metrics>) -> Self {
        Self {
            stream,
            next_tid: 0,
            metrics,
        }
    }

    /// One FC03/FC04 read of `req` from `unit`, answered within `limit`.
    pub(crate) async fn read(
        &mut self,
        unit: UnitId,
        function: FunctionCode,
        req: ReadRequest,
        limit: Duration,
    ) -> Result<Vec<u16>, PollError> {
        let tid = self.next_tid;
        self.next_tid = tid.wrapping_add(1);
        let request = encode_request(tid, unit, function, req);
        let deadline = Instant::now() + limit;
        let sent = async {
            self.stream.write_all(&request).await?;
            self.stream.flush().await
        };
        timeout_at(deadline, sent)
            .await
            .map_err(|_| PollError::Timeout(limit))??;
        loop {
            let frame = timeout_at(deadline, self.read_frame())
                .await
                .map_err(|_| PollError::Timeout(limit))??;
            if frame.tid != tid {
                self.metrics.modbus_stale_replies.inc();
                debug!(unit = %unit, expected = tid, got = frame.tid, "stale modbus reply discarded");
                continue;
            }
            return check_reply(&frame, unit, function, req);
        }
    }

    async fn read_frame(&mut self) -> Result<Frame, PollError> {
        let mut header = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut header).await?;
        let tid = u16::from_be_bytes([header[0], header[1]]);
        let protocol = u16::from_be_bytes([header[2], header[3]]);
        let len = usize::from(u16::from_be_bytes([header[4], header[5]]));
        if protocol != 0 {
            return Err(PollError::BadFrame(format!(
                "protocol id {protocol} in the MBAP header (Modbus is 0)"
            )));
        }
        // The length counts the unit id and the PDU.
        if !(2..=MAX_PDU + 1).contains(&len) {
            return Err(PollError::BadFrame(format!(
                "MBAP length {len} outside 2..={}",
                MAX_PDU + 1
            )));
        }
        let mut pdu = vec![0u8; len - 1];
        self.stream.read_exact(&mut pdu).await?;
        Ok(Frame {
            tid,
            unit: header[6],
            pdu,
        })
    }
}

/// The request ADU for `tid`.
fn encode_request(tid: u16, unit: UnitId, function: FunctionCode, req: ReadRequest) -> [u8; 12] {
    let mut f = [0u8; 12];
    f[0..2].copy_from_slice(&tid.to_be_bytes());
    // Protocol id 0, then the length of unit id and PDU.
    f[4..6].copy_from_slice(&6u16.to_be_bytes());
    f[6] = unit.0;
    f[7] = function.code();
    f[8..10].copy_from_slice(&req.start.0.to_be_bytes());
    f[10..12].copy_from_slice(&req.count.to_be_bytes());
    f
}

/// The registers of `frame` if it answers the request, or why not.
fn check_reply(
    frame: &Frame,
    unit: UnitId,
    function: FunctionCode,
    req: ReadRequest,
) -> Result<Vec<u16>, PollError> {
    if frame.unit != unit.0 {
        return Err(PollError::BadFrame(format!(
            "reply from unit {} to a request for unit {unit}",
            frame.unit
        )));
    }
    let fc = function.code();
    match frame.pdu.as_slice() {
        [f, code, ..] if *f == fc | 0x80 => Err(PollError::Exception((*code).into())),
        [f, count, data @ ..] if *f == fc => {
            let want = 2 * usize::from(req.count);
            if usize::from(*count) != data.len() || data.len() != want {
                return Err(PollError::BadFrame(format!(
                    "asked for {} registers at {}, got {} bytes",
                    req.count,
                    req.start,
                    data.len()
                )));
            }
            Ok(data
                .chunks_exact(2)
                .map(|w| u16::from_be_bytes([w[0], w[1]]))
                .collect())
        }
        [f, ..] => Err(PollError::BadFrame(format!(
            "function 0x{f:02X} in the reply to a function 0x{fc:02X} request"
        ))),
        [] => Err(PollError::BadFrame("empty reply".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::RegisterAddress;
    use tokio::io::duplex;

    const REQ: ReadRequest = ReadRequest {
        start: RegisterAddress(10),
        count: 2,
    };

    fn reply(tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut f = tid.to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&u16::try_from(pdu.len() + 1).unwrap().to_be_bytes());
        f.push(unit);
        f.extend_from_slice(pdu);
        f
    }

    #[tokio::test(start_paused = true)]
    async fn stale_copies_are_read_past_and_counted() {
        let (client, mut server) = duplex(4096);
        let metrics = Arc::new(Metrics::default());
        let mut c = MbapClient::new(client, metrics.clone());
        let limit = Duration::from_secs(1);
        tokio::spawn(async move {
            let mut req = [0u8; 12];
            for tid in 0..2u16 {
                server.read_exact(&mut req).await.unwrap();
                assert_eq!(&req[..2], &tid.to_be_bytes());
                let r = reply(tid, 7, &[4, 4, 0, tid as u8, 0, 9]);
                // Every reply twice: the copy of the first precedes the second's reply.
                server.write_all(&r).await.unwrap();
                server.write_all(&r).await.unwrap();
            }
            std::future::pending::<()>().await;
        });
        for tid in 0..2u16 {
            let words = c
                .read(UnitId(7), FunctionCode::ReadInput, REQ, limit)
                .await
                .unwrap();
            assert_eq!(words, vec![tid, 9]);
        }
        assert_eq!(metrics.modbus_stale_replies.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn replies_that_do_not_fit_are_told_apart() {
        let cases: [(Vec<u8>, &str); 5] = [
            (reply(0, 7, &[0x84, 2]), "Exception(IllegalDataAddress)"),
            (reply(0, 8, &[4, 4, 0, 1, 0, 2]), "unit 8"),
            (reply(0, 7, &[3, 4, 0, 1, 0, 2]), "function 0x03"),
            (reply(0, 7, &[4, 2, 0, 1]), "got 2 bytes"),
            (vec![0, 0, 0, 0, 1, 0, 7], "MBAP length 256"),
        ];
        for (bytes, want) in cases {
            let (client, mut server) = duplex(4096);
            let mut c = MbapClient::new(client, Arc::new(Metrics::default()));
            tokio::spawn(async move {
                let mut req = [0u8; 12];
                server.read_exact(&mut req).await.unwrap();
                server.write_all(&bytes).await.unwrap();
                std::future::pending::<()>().await;
            });
            let e = c
                .read(
                    UnitId(7),
                    FunctionCode::ReadInput,
                    REQ,
                    Duration::from_secs(1),
                )
                .await
                .unwrap_err();
            let text = format!("{e:?}");
            assert!(text.contains(want), "{text} lacks {want}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_stale_copies_time_out() {
        let (client, mut server) = duplex(4096);
        let mut c = MbapClient::new(client, Arc::new(Metrics::default()));
        tokio::spawn(async move {
            let mut req = [0u8; 12];
            server.read_exact(&mut req).await.unwrap();
            server
                .write_all(&reply(41, 7, &[4, 4, 0, 1, 0, 2]))
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let e = c
            .read(
                UnitId(7),
                FunctionCode::ReadInput,
                REQ,
                Duration::from_secs(1),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, PollError::Timeout(_)), "{e:?}");
    }
}
