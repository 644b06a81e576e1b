//! Modbus RTU for [`SimMeters`]: the meters as a bus behind any byte stream — a
//! pseudo-terminal (serial), an RTU-over-TCP listener, or a connection the simulator
//! dials to a gateway's DTU listener (with its registration packet and heartbeats).
//!
//! Requests are found with the same framing code the gateway uses (CRC checked, noise
//! skipped) and answered one at a time, in order, like a half-duplex bus. Besides the
//! per-unit [`Fault`]s of the register model (slow, silent, exception), a unit can
//! show line faults ([`LineFault`]): a reply after the client's timeout, a corrupted
//! CRC, garbage before the reply, or a reply written in fragments. [`Chaos`] draws
//! such faults at random for a share of all replies. With a baud rate set
//! ([`RtuSim::with_baud`]) every frame takes its wire time, so bus cycle times can be
//! measured.
//!
//! [`Fault`]: super::Fault

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::meter::{Fault, SimMeters};
use crate::profile::{FunctionCode, LineSettings};
use crate::reading::{RegisterAddress, UnitId};
use crate::source::rtu::frame::{self, ServerRequest};
use crate::source::rtu::LineTiming;

/// A fault on the line for one unit's replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFault {
    None,
    /// Replies after this delay (longer than the client's timeout: a late reply).
    Late(Duration),
    /// Replies with one byte flipped.
    CorruptCrc,
    /// Sends random bytes before the reply.
    Garbage,
    /// Writes the reply in several pieces with pauses between them.
    Fragments,
}

/// Random line faults for a share of all replies.
#[derive(Debug, Clone, Copy)]
pub struct Chaos {
    /// Share of replies that get a fault, 0.0..=1.0.
    pub rate: f64,
    /// Delay of a late reply.
    pub late: Duration,
    pub seed: u64,
}

/// Faults injected so far, by kind.
#[derive(Debug, Default)]
pub struct InjectedFaults {
    pub late: AtomicU64,
    pub corrupt: AtomicU64,
    pub garbage: AtomicU64,
    pub fragments: AtomicU64,
    pub replies: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    line_faults: Mutex<HashMap<u8, LineFault>>,
    chaos: Option<(Chaos, Mutex<StdRng>)>,
    injected: InjectedFaults,
}

/// Simulated meters speaking Modbus RTU. Cheap to clone; clones share faults.
#[derive(Debug, Clone)]
pub struct RtuSim {
    meters: SimMeters,
    timing: Option<LineTiming>,
    shared: Arc<Shared>,
}

impl RtuSim {
    pub fn new(meters: SimMeters) -> Self {
        Self {
            meters,
            timing: None,
            shared: Arc::new(Shared {
                line_faults: Mutex::new(HashMap::new()),
                chaos: None,
                injected: InjectedFaults::default(),
            }),
        }
    }

    /// Emulates `line`'s wire time for every frame received and sent.
    pub fn with_baud(mut self, line: &LineSettings) -> Self {
        self.timing = Some(LineTiming::new(line));
        self
    }

    /// Random line faults (set before cloning).
    pub fn with_chaos(mut self, chaos: Chaos) -> Self {
        let rng = StdRng::seed_from_u64(chaos.seed);
        self.shared = Arc::new(Shared {
            line_faults: Mutex::new(HashMap::new()),
            chaos: Some((chaos, Mutex::new(rng))),
            injected: InjectedFaults::default(),
        });
        self
    }

    pub(crate) fn set_line_fault(&self, unit: UnitId, fault: LineFault) {
        self.shared
            .line_faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(unit.0, fault);
    }

    pub fn injected(&self) -> &InjectedFaults {
        &self.shared.injected
    }

    /// Serves requests arriving on `stream` until it closes or `shutdown`. With
    /// `heartbeat`, that packet is written every period between replies.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        shutdown: CancellationToken,
        heartbeat: Option<(Vec<u8>, Duration)>,
    ) -> io::Result<()> {
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 512];
        let period = heartbeat
            .as_ref()
            .map_or(Duration::from_secs(86_400), |(_, p)| *p);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = ticker.tick(), if heartbeat.is_some() => {
                    if let Some((packet, _)) = &heartbeat {
                        stream.write_all(packet).await?;
                    }
                    continue;
                }
                r = stream.read(&mut chunk) => {
                    let n = r?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
            loop {
                match frame::parse_request(&buf) {
                    Ok((req, used)) => {
                        buf.drain(..used);
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            r = self.respond(&mut stream, req) => r?,
                        }
                    }
                    Err(noise) => {
                        buf.drain(..noise);
                        break;
                    }
                }
            }
            if buf.len() > 4 * frame::MAX_FRAME {
                buf.clear();
            }
        }
    }

    async fn respond<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        req: ServerRequest,
    ) -> io::Result<()> {
        if let Some(t) = self.timing {
            tokio::time::sleep(t.bytes(frame::REQUEST_LEN)).await;
        }
        let unit = UnitId(req.unit);
        if let Fault::Slow(delay) = self.meters.fault(unit) {
            tokio::time::sleep(delay).await;
        }
        let start = RegisterAddress(req.start);
        let answer = match req.function {
            3 => self
                .meters
                .answer(unit, FunctionCode::ReadHolding, start, req.count),
            4 => self
                .meters
                .answer(unit, FunctionCode::ReadInput, start, req.count),
            _ => self.meters.reject(unit).map(Err),
        };
        let Some(answer) = answer else {
            return Ok(());
        };
        let mut out = match answer {
            Ok(words) => frame::encode_reply(req.unit, req.function, &words),
            Err(code) => frame::encode_exception(req.unit, req.function, u8::from(code)),
        };
        let injected = &self.shared.injected;
        injected.replies.fetch_add(1, Ordering::Relaxed);
        let (fault, noise) = self.draw(unit);
        if let Some(t) = self.timing {
            tokio::time::sleep(t.bytes(out.len())).await;
        }
        match fault {
            LineFault::None => stream.write_all(&out).await?,
            LineFault::Late(delay) => {
                injected.late.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                stream.write_all(&out).await?;
            }
            LineFault::CorruptCrc => {
                injected.corrupt.fetch_add(1, Ordering::Relaxed);
                let at = noise.first().map_or(0, |&b| usize::from(b)) % out.len();
                out[at] ^= 0x5A;
                stream.write_all(&out).await?;
            }
            LineFault::Garbage => {
                injected.garbage.fetch_add(1, Ordering::Relaxed);
                stream.write_all(&noise).await?;
                stream.flush().await?;
                tokio::time::sleep(Duration::from_millis(1)).await;
                stream.write_all(&out).await?;
            }
            LineFault::Fragments => {
                injected.fragments.fetch_add(1, Ordering::Relaxed);
                let pieces = out.len().div_ceil(3).max(1);
                for piece in out.chunks(pieces) {
                    stream.write_all(piece).await?;
                    stream.flush().await?;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        stream.flush().await
    }

    /// The line fault for this reply and some random bytes for it.
    fn draw(&self, unit: UnitId) -> (LineFault, Vec<u8>) {
        let set = self
            .shared
            .line_faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&unit.0)
            .copied()
            .unwrap_or(LineFault::None);
        let Some((chaos, rng)) = &self.shared.chaos else {
            let noise = vec![0xFF, 0x00, 0xA5, unit.0, 0x04, 0x13];
            return (set, noise);
        };
        let mut rng = rng.lock().unwrap_or_else(PoisonError::into_inner);
        let len = rng.gen_range(1..=24);
        let noise: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        if set != LineFault::None {
            return (set, noise);
        }
        if !rng.gen_bool(chaos.rate.clamp(0.0, 1.0)) {
            return (LineFault::None, noise);
        }
        let fault = match rng.gen_range(0..4) {
            0 => LineFault::Late(chaos.late),
            1 => LineFault::CorruptCrc,
            2 => LineFault::Garbage,
            _ => LineFault::Fragments,
        };
        (fault, noise)
    }
}

/// Serves RTU over TCP on `listener` (one bus per connection) until `shutdown`.
pub async fn serve_rtu_tcp(
    listener: TcpListener,
    sim: RtuSim,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, "sim serving modbus rtu over tcp");
    loop {
        let (stream, peer): (TcpStream, SocketAddr) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => r?,
        };
        let _ = stream.set_nodelay(true);
        let sim = sim.clone();
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = sim.serve(stream, token, None).await {
                tracing::debug!(peer = %peer, error = %e, "sim rtu connection ended");
            }
        });
    }
}

/// Dials a gateway's DTU listener like a 4G DTU: sends `id` as the registration
/// packet, then serves RTU and sends `id` as heartbeat every `heartbeat`. Reconnects
/// after a second when the connection fails, until `shutdown`.
pub async fn dial_dtu(
    address: String,
    id: String,
    heartbeat: Duration,
    sim: RtuSim,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        match TcpStream::connect(&address).await {
            Ok(mut s) => {
                let _ = s.set_nodelay(true);
                if s.write_all(id.as_bytes()).await.is_ok() {
                    tracing::info!(address = %address, id = %id, "sim dtu registered");
                    let hb = Some((id.as_bytes().to_vec(), heartbeat));
                    if let Err(e) = sim.serve(s, shutdown.clone(), hb).await {
                        tracing::debug!(error = %e, "sim dtu connection ended");
                    }
                }
            }
            Err(e) => tracing::debug!(address = %address, error = %e, "sim dtu cannot connect"),
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::{timeout, Instant};

    use super::*;
    use crate::profile::Parity;
    use crate::sim::fixtures::test_profile;

    const LINE: LineSettings = LineSettings {
        baud: 9600,
        data_bits: 8,
        parity: Parity::None,
        stop_bits: 1,
    };

    /// Serves `sim` on one end of an in-memory stream; returns the other end.
    fn serve(sim: &RtuSim, shutdown: &CancellationToken) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(1024);
        let sim = sim.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { sim.serve(server, shutdown, None).await });
        client
    }

    /// Sends a read of two input registers from `unit`; returns the reply (9 bytes) and
    /// how long it took on the paused clock.
    async fn read_two(
        bus: &mut tokio::io::DuplexStream,
        unit: u8,
        limit: Duration,
    ) -> Option<(Vec<u8>, Duration)> {
        let started = Instant::now();
        bus.write_all(&frame::encode_any_request(unit, 4, 0, 2))
            .await
            .unwrap();
        let mut reply = vec![0u8; 9];
        timeout(limit, bus.read_exact(&mut reply))
            .await
            .ok()
            .map(|r| {
                r.unwrap();
                (reply, started.elapsed())
            })
    }

    /// The timer wheel counts whole milliseconds: each sleep may end up to 1 ms late.
    fn about(elapsed: Duration, want: Duration, sleeps: u32) {
        assert!(
            elapsed >= want && elapsed <= want + Duration::from_millis(sleeps.into()),
            "took {elapsed:?}, wire and fault time {want:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn with_baud_every_frame_takes_its_wire_time_and_a_slow_unit_adds_its_delay() {
        let meters = SimMeters::new(test_profile(), 2, 7).with_tick(Duration::from_secs(3600));
        meters.set_fault(UnitId(2), Fault::Slow(Duration::from_millis(250)));
        let sim = RtuSim::new(meters.clone()).with_baud(&LINE);
        let shutdown = CancellationToken::new();
        let mut bus = serve(&sim, &shutdown);
        let t = LineTiming::new(&LINE);
        let wire = t.bytes(frame::REQUEST_LEN) + t.bytes(9);
        // 9600 baud, 10 bits a byte: about 8 ms for the request, 9 ms for the reply.
        assert!(wire > Duration::from_millis(15), "{wire:?}");

        let (reply, took) = read_two(&mut bus, 1, Duration::from_secs(5)).await.unwrap();
        let words = meters
            .read(UnitId(1), FunctionCode::ReadInput, RegisterAddress(0), 2)
            .unwrap();
        assert_eq!(reply, frame::encode_reply(1, 4, &words));
        about(took, wire, 2);

        let (_, took) = read_two(&mut bus, 2, Duration::from_secs(5)).await.unwrap();
        about(took, wire + Duration::from_millis(250), 3);
        assert_eq!(sim.injected().replies.load(Ordering::Relaxed), 2);
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_unit_never_answers_and_the_bus_serves_the_next_request() {
        let meters = SimMeters::new(test_profile(), 2, 8).with_tick(Duration::from_secs(3600));
        meters.set_fault(UnitId(1), Fault::Silent);
        let sim = RtuSim::new(meters);
        let shutdown = CancellationToken::new();
        let mut bus = serve(&sim, &shutdown);
        // An hour of silence costs nothing on the paused clock.
        assert!(read_two(&mut bus, 1, Duration::from_secs(3600))
            .await
            .is_none());
        let (reply, took) = read_two(&mut bus, 2, Duration::from_secs(5)).await.unwrap();
        assert_eq!(reply[..2], [2, 4]);
        assert_eq!(took, Duration::ZERO, "no baud emulation: answered at once");
        shutdown.cancel();
    }
}
