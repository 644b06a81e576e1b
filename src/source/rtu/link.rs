//! One RTU transaction at a time over any byte stream (serial port, TCP, DTU).
//!
//! [`Transactor::transact`] waits until the line has been silent for the
//! inter-frame time (reading and discarding anything that arrives meanwhile), sends
//! the request, and reads until [`frame::find_reply`] finds the frame that answers it
//! or the timeout runs out. Bytes that are not that frame are discarded and counted.
//! After a timeout or a bad frame the input is drained until the line is silent, so a
//! late reply is thrown away instead of being read as the answer to the next request;
//! a reply can in any case only be accepted for the unit, function and length it
//! answers.
//!
//! Received frames are not delimited by the 1.5-character gap: serial servers, DTUs
//! and USB adapters re-chunk bytes freely, so the reply is recognised by its content
//! (CRC, unit, function, byte count) instead. A device that is never addressed again
//! while its late reply may still arrive (the bus's backoff guarantees that) cannot
//! have that reply taken for a later request.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout, timeout_at, Instant};

use super::frame::{self, Expect, Reply, Scan};
use super::timing::LineTiming;
use crate::profile::FunctionCode;
use crate::reading::UnitId;
use crate::source::modbus::ReadRequest;

/// How long draining may go on when the line never falls silent.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// How one RTU transaction failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RtuError {
    /// The device answered with a Modbus exception.
    #[error("device exception 0x{0:02X}")]
    Exception(u8),
    /// Nothing that could be a reply arrived in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Bytes arrived but none formed a valid reply (CRC, unit, function or length).
    #[error("no valid reply in {0} bytes received")]
    BadFrame(usize),
    /// The line is noisy: it never fell silent before sending.
    #[error("line never silent for {0:?}")]
    Noisy(Duration),
    /// The port or connection failed or closed.
    #[error("transport: {0}")]
    Io(#[from] std::io::Error),
}

/// Byte counts a link has seen, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub requests: u64,
    pub replies: u64,
    /// Bytes read and discarded: noise, late replies, bad frames, heartbeats.
    pub discarded_bytes: u64,
}

/// A stream the bus speaks RTU over.
pub trait RtuStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> RtuStream for T {}

/// A boxed stream, so serial ports, TCP and DTU connections share one bus task.
pub(crate) type BoxedStream = Box<dyn RtuStream>;

/// Runs transactions over one stream.
pub(crate) struct Transactor<S> {
    stream: S,
    timing: LineTiming,
    /// Packets a DTU interleaves (heartbeats); removed from the input before parsing.
    filters: Vec<Vec<u8>>,
    buf: Vec<u8>,
    /// Reference point of the inter-frame silence (reset when draining starts).
    last_rx: Instant,
    /// When bytes last arrived (replies, heartbeats, noise): the stream is alive.
    last_heard: Instant,
    pub stats: LinkStats,
}

impl<S> std::fmt::Debug for Transactor<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactor")
            .field("timing", &self.timing)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Transactor<S> {
    pub(crate) fn new(stream: S, timing: LineTiming, filters: Vec<Vec<u8>>) -> Self {
        Self {
            stream,
            timing,
            filters: filters.into_iter().filter(|f| !f.is_empty()).collect(),
            buf: Vec::with_capacity(2 * frame::MAX_FRAME),
            last_rx: Instant::now(),
            last_heard: Instant::now(),
            stats: LinkStats::default(),
        }
    }

    /// One FC03/FC04 read of `req` from `unit`.
    pub(crate) async fn read(
        &mut self,
        unit: UnitId,
        function: FunctionCode,
        req: ReadRequest,
        limit: Duration,
    ) -> Result<Vec<u16>, RtuError> {
        let expect = Expect::new(unit, function, req);
        let request = frame::encode_request(unit, function, req);
        match self.transact(&request, &expect, limit).await? {
            Reply::Registers(words) => Ok(words),
            Reply::Exception(code) => Err(RtuError::Exception(code)),
        }
    }

    /// Sends `request` after the inter-frame silence and waits for the reply `expect`
    /// describes.
    pub(crate) async fn transact(
        &mut self,
        request: &[u8],
        expect: &Expect,
        limit: Duration,
    ) -> Result<Reply, RtuError> {
        self.wait_silence(self.timing.silence).await?;
        self.stream.write_all(request).await?;
        self.stream.flush().await?;
        self.stats.requests += 1;
        // The request and the reply take their wire time on top of the timeout.
        let deadline = Instant::now()
            + self.timing.bytes(request.len())
            + self.timing.bytes(expect.reply_len())
            + limit;
        self.buf.clear();
        let mut chunk = [0u8; 512];
        loop {
            let n = match timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => break,
                Ok(Ok(0)) => {
                    return Err(RtuError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(RtuError::Io(e)),
            };
            self.heard();
            self.buf.extend_from_slice(&chunk[..n]);
            self.strip_filters();
            if let Scan::Found {
                reply,
                skipped,
                end,
            } = frame::find_reply(&self.buf, expect)
            {
                let extra = skipped + (self.buf.len() - end);
                self.stats.discarded_bytes += extra as u64;
                self.stats.replies += 1;
                if self.buf.len() > end {
                    // Something followed the reply: let the line settle before the next request.
                    self.drain().await?;
                }
                return Ok(reply);
            }
            // Keep the buffer bounded: a candidate that started more than one frame
            // ago can no longer complete.
            let keep = expect.reply_len().max(5);
            if self.buf.len() > 2 * frame::MAX_FRAME {
                let cut = self.buf.len() - keep;
                self.stats.discarded_bytes += cut as u64;
                self.buf.drain(..cut);
            }
        }
        let received = self.buf.len();
        self.stats.discarded_bytes += received as u64;
        self.buf.clear();
        self.drain().await?;
        if received == 0 {
            Err(RtuError::Timeout(limit))
        } else {
            Err(RtuError::BadFrame(received))
        }
    }

    /// Reads and discards until the line has been silent for the inter-frame time.
    pub(crate) async fn drain(&mut self) -> Result<(), RtuError> {
        let quiet = self.timing.silence.max(Duration::from_millis(5));
        self.last_rx = Instant::now();
        self.wait_silence(quiet).await
    }

    /// Waits until nothing arrived for `quiet`, discarding what does arrive.
    async fn wait_silence(&mut self, quiet: Duration) -> Result<(), RtuError> {
        let started = Instant::now();
        let mut chunk = [0u8; 512];
        loop {
            let wait = (self.last_rx + quiet).saturating_duration_since(Instant::now());
            match timeout(wait, self.stream.read(&mut chunk)).await {
                Err(_) => return Ok(()),
                Ok(Ok(0)) => return Err(RtuError::Io(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(Ok(n)) => {
                    self.stats.discarded_bytes += n as u64;
                    self.heard();
                    if started.elapsed() > DRAIN_LIMIT {
                        return Err(RtuError::Noisy(quiet));
                    }
                }
                Ok(Err(e)) => return Err(RtuError::Io(e)),
            }
        }
    }

    /// When bytes last arrived on the stream (the stream's opening counts).
    pub(crate) fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// Reads and discards between transactions until the stream closes or fails
    /// (late replies, heartbeats, noise would be drained before the next request
    /// anyway). Returns why it ended; cancel-safe.
    pub(crate) async fn closed(&mut self) -> RtuError {
        let mut chunk = [0u8; 512];
        loop {
            match self.stream.read(&mut chunk).await {
                Ok(0) => return RtuError::Io(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.stats.discarded_bytes += n as u64;
                    self.heard();
                }
                Err(e) => return RtuError::Io(e),
            }
        }
    }

    fn heard(&mut self) {
        let now = Instant::now();
        self.last_rx = now;
        self.last_heard = now;
    }

    /// Removes every occurrence of a filtered packet (DTU heartbeat) from the buffer.
    fn strip_filters(&mut self) {
        for f in &self.filters {
            while let Some(at) = self.buf.windows(f.len()).position(|w| w == f.as_slice()) {
                self.buf.drain(at..at + f.len());
                self.stats.discarded_bytes += f.len() as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::line::DEFAULT_LINE;
    use crate::reading::RegisterAddress;
    use tokio::io::duplex;

    fn req() -> ReadRequest {
        ReadRequest {
            start: RegisterAddress(0),
            count: 2,
        }
    }

    fn fast() -> LineTiming {
        LineTiming::new(&crate::profile::LineSettings {
            baud: 115_200,
            ..DEFAULT_LINE
        })
    }

    #[tokio::test]
    async fn late_reply_is_drained_not_taken_for_the_next_answer() {
        let (client, mut server) = duplex(4096);
        let mut t = Transactor::new(client, fast(), vec![b"HB".to_vec()]);
        let limit = Duration::from_millis(50);
        let server_task = tokio::spawn(async move {
            let mut b = [0u8; 8];
            server.read_exact(&mut b).await.unwrap();
            // First request: answered after the timeout with values 1, 2.
            tokio::time::sleep(Duration::from_millis(70)).await;
            server
                .write_all(&frame::encode_reply(1, 4, &[1, 2]))
                .await
                .unwrap();
            server.read_exact(&mut b).await.unwrap();
            // Second request: a heartbeat, noise, then the right answer in two pieces.
            let reply = frame::encode_reply(1, 4, &[3, 4]);
            server.write_all(b"HB\x00\x01").await.unwrap();
            server.write_all(&reply[..3]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            server.write_all(&reply[3..]).await.unwrap();
            server
        });
        let first = t
            .read(UnitId(1), FunctionCode::ReadInput, req(), limit)
            .await;
        assert!(matches!(first, Err(RtuError::Timeout(_))), "{first:?}");
        // The late reply arrives while the bus waits for silence before the next request.
        tokio::time::sleep(Duration::from_millis(40)).await;
        let second = t
            .read(UnitId(1), FunctionCode::ReadInput, req(), limit)
            .await
            .unwrap();
        assert_eq!(second, vec![3, 4]);
        assert!(t.stats.discarded_bytes >= 9 + 4, "{:?}", t.stats);
        drop(server_task.await.unwrap());
    }

    #[tokio::test]
    async fn exception_and_bad_crc_are_told_apart() {
        let (client, mut server) = duplex(4096);
        let mut t = Transactor::new(client, fast(), Vec::new());
        let limit = Duration::from_millis(50);
        tokio::spawn(async move {
            let mut b = [0u8; 8];
            server.read_exact(&mut b).await.unwrap();
            server
                .write_all(&frame::encode_exception(1, 4, 2))
                .await
                .unwrap();
            server.read_exact(&mut b).await.unwrap();
            let mut bad = frame::encode_reply(1, 4, &[1, 2]);
            bad[4] ^= 1;
            server.write_all(&bad).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let e = t
            .read(UnitId(1), FunctionCode::ReadInput, req(), limit)
            .await;
        assert!(matches!(e, Err(RtuError::Exception(2))), "{e:?}");
        let e = t
            .read(UnitId(1), FunctionCode::ReadInput, req(), limit)
            .await;
        assert!(matches!(e, Err(RtuError::BadFrame(9))), "{e:?}");
    }
}
