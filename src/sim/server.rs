//! Modbus TCP server for [`SimMeters`]: many unit ids behind one endpoint, like a
//! serial device server (DTU) in front of an RS-485 bus.
//!
//! Built on tokio-modbus's `Server`: one task per connection, requests of one
//! connection answered in order. FC03/FC04 reads are served by
//! [`SimMeters::read`]'s rules; every other function gets `IllegalFunction` (or the
//! unit's exception fault). Unknown unit ids and `Silent` units get no response at
//! all, and the connection keeps serving the next request, as a real bus would.
//! `Slow` units answer after their delay, which holds up later requests of the same
//! connection (one request at a time, like a half-duplex bus).
//!
//! Shutdown: cancelling the token stops accepting, and tokio-modbus cancels every
//! connection task when the accept loop ends, closing its socket; a pending `Slow`
//! answer is abandoned. Connection errors (a client resetting, a malformed frame)
//! end that connection only and are logged at DEBUG.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::net::TcpListener;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};
use tokio_util::sync::CancellationToken;

use super::meter::{Fault, SimMeters};
use crate::profile::FunctionCode;
use crate::reading::{RegisterAddress, UnitId};

type Answer = Result<Option<Response>, ExceptionCode>;

/// The tokio-modbus service of one connection.
#[derive(Debug, Clone)]
struct SimService {
    meters: SimMeters,
    shutdown: CancellationToken,
    peer: SocketAddr,
}

impl tokio_modbus::server::Service for SimService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.answer(req).await })
    }
}

impl SimService {
    async fn answer(self, req: SlaveRequest<'static>) -> Answer {
        let unit = UnitId(req.slave);
        if let Fault::Slow(delay) = self.meters.fault(unit) {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.cancelled() => return Ok(None),
            }
        }
        let (function, start, count) = match req.request {
            Request::ReadHoldingRegisters(start, count) => {
                (FunctionCode::ReadHolding, start, count)
            }
            Request::ReadInputRegisters(start, count) => (FunctionCode::ReadInput, start, count),
            other => {
                tracing::trace!(peer = %self.peer, unit = %unit, function = %other.function_code(), "sim unsupported function");
                return self.meters.reject(unit).map_or(Ok(None), Err);
            }
        };
        let answer = self
            .meters
            .answer(unit, function, RegisterAddress(start), count);
        tracing::trace!(peer = %self.peer, unit = %unit, start, count, answered = answer.is_some(), "sim read");
        match answer {
            None => Ok(None),
            Some(Err(code)) => Err(code),
            Some(Ok(words)) => Ok(Some(match function {
                FunctionCode::ReadHolding => Response::ReadHoldingRegisters(words),
                FunctionCode::ReadInput => Response::ReadInputRegisters(words),
            })),
        }
    }
}

/// Serves Modbus TCP on `listener` until `shutdown` is cancelled. Every unit id of
/// `meters` is reachable through this one endpoint. Returns an error only when
/// accepting connections fails.
pub async fn serve(
    listener: TcpListener,
    meters: SimMeters,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, profile = %meters.profile().name, "sim serving");
    let server = Server::new(listener);
    let on_connected = |stream, peer: SocketAddr| {
        tracing::debug!(peer = %peer, "sim connection accepted");
        let service = SimService {
            meters: meters.clone(),
            shutdown: shutdown.clone(),
            peer,
        };
        async move { accept_tcp_connection(stream, peer, |_| Ok(Some(service.clone()))) }
    };
    let on_process_error = |err: io::Error| {
        tracing::debug!(error = %err, "sim connection failed");
    };
    let result = server
        .serve_until(
            &on_connected,
            on_process_error,
            shutdown.clone().cancelled_owned(),
        )
        .await;
    match &result {
        Ok(_) => tracing::info!(addr = %addr, "sim stopped"),
        Err(err) => tracing::warn!(addr = %addr, error = %err, "sim stopped accepting"),
    }
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::task::JoinHandle;
    use tokio::time::{timeout, Instant};
    use tokio_modbus::client::{tcp::connect_slave, Context, Reader, Writer};
    use tokio_modbus::Slave;

    use super::*;
    use crate::sim::fixtures::test_profile;

    /// Generous bound for anything that should happen promptly.
    const PROMPT: Duration = Duration::from_secs(5);
    /// How long a test waits for an answer that must not come.
    const NO_ANSWER: Duration = Duration::from_millis(300);

    struct Running {
        addr: SocketAddr,
        shutdown: CancellationToken,
        task: JoinHandle<io::Result<()>>,
    }

    impl Running {
        async fn start(meters: SimMeters) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(serve(listener, meters, shutdown.clone()));
            Self {
                addr,
                shutdown,
                task,
            }
        }

        async fn connect(&self, unit: u8) -> Context {
            timeout(PROMPT, connect_slave(self.addr, Slave(unit)))
                .await
                .expect("connects promptly")
                .expect("connects")
        }

        async fn stop(self) {
            self.shutdown.cancel();
            timeout(PROMPT, self.task)
                .await
                .expect("server stops promptly")
                .expect("server task joins")
                .expect("server ends cleanly");
        }
    }

    fn meters() -> SimMeters {
        SimMeters::new(test_profile(), 3, 7).with_tick(Duration::from_secs(3600))
    }

    #[tokio::test]
    async fn tcp_client_reads_the_served_words() {
        let m = meters();
        let sim = Running::start(m.clone()).await;
        let mut ctx = sim.connect(1).await;
        let words = timeout(PROMPT, ctx.read_input_registers(0, 0x32))
            .await
            .expect("answers promptly")
            .expect("no transport error")
            .expect("no exception");
        // Same tick, so a direct read serves the same snapshot.
        let direct = m.read(UnitId(1), FunctionCode::ReadInput, RegisterAddress(0), 0x32);
        assert_eq!(Ok(words.clone()), direct);
        let history = m.history(UnitId(1));
        assert_eq!(history.len(), 1);
        let volts = f32::from_bits(u32::from(words[0]) << 16 | u32::from(words[1]));
        let name = crate::reading::FieldName::new("voltage_l1").unwrap();
        assert_eq!(
            crate::profile::decimal::widen_f32(volts),
            history[0].values[&name],
            "the history holds the decoded value: the f32's shortest decimal"
        );
        sim.stop().await;
    }

    #[tokio::test]
    async fn silent_unit_times_out_while_another_unit_answers_on_a_new_connection() {
        let m = meters();
        m.set_fault(UnitId(2), Fault::Silent);
        let sim = Running::start(m.clone()).await;
        let mut silent = sim.connect(2).await;
        let waited = timeout(NO_ANSWER, silent.read_input_registers(0, 2)).await;
        assert!(waited.is_err(), "silent unit answered: {waited:?}");
        let mut other = sim.connect(1).await;
        let words = timeout(PROMPT, other.read_input_registers(0, 2))
            .await
            .expect("answers promptly")
            .expect("no transport error")
            .expect("no exception");
        assert_eq!(words.len(), 2);
        assert_eq!(m.requests_served(UnitId(2)), 0);
        assert_eq!(m.requests_served(UnitId(1)), 1);
        sim.stop().await;
    }

    #[tokio::test]
    async fn unknown_unit_is_not_answered() {
        let sim = Running::start(meters()).await;
        let mut ctx = sim.connect(9).await;
        let waited = timeout(NO_ANSWER, ctx.read_input_registers(0, 2)).await;
        assert!(waited.is_err(), "unknown unit answered: {waited:?}");
        sim.stop().await;
    }

    #[tokio::test]
    async fn exception_fault_reaches_the_client() {
        let m = meters();
        m.set_fault(UnitId(3), Fault::Exception(ExceptionCode::ServerDeviceBusy));
        let sim = Running::start(m).await;
        let mut ctx = sim.connect(3).await;
        let answer = timeout(PROMPT, ctx.read_input_registers(0, 2))
            .await
            .expect("answers promptly")
            .expect("no transport error");
        assert_eq!(answer, Err(ExceptionCode::ServerDeviceBusy));
        sim.stop().await;
    }

    #[tokio::test]
    async fn bad_requests_get_modbus_exceptions() {
        let sim = Running::start(meters()).await;
        let mut ctx = sim.connect(1).await;
        let out_of_map = timeout(PROMPT, ctx.read_input_registers(0x31, 2))
            .await
            .expect("answers promptly")
            .expect("no transport error");
        assert_eq!(out_of_map, Err(ExceptionCode::IllegalDataAddress));
        let wrong_fc = timeout(PROMPT, ctx.read_holding_registers(0, 2))
            .await
            .expect("answers promptly")
            .expect("no transport error");
        assert_eq!(wrong_fc, Err(ExceptionCode::IllegalFunction));
        let write = timeout(PROMPT, ctx.write_single_register(0, 1))
            .await
            .expect("answers promptly")
            .expect("no transport error");
        assert_eq!(write, Err(ExceptionCode::IllegalFunction));
        sim.stop().await;
    }

    #[tokio::test]
    async fn slow_unit_answers_after_its_delay() {
        let delay = Duration::from_millis(200);
        let m = meters();
        m.set_fault(UnitId(1), Fault::Slow(delay));
        let sim = Running::start(m).await;
        let mut ctx = sim.connect(1).await;
        let started = Instant::now();
        let answer = timeout(PROMPT, ctx.read_input_registers(0, 2))
            .await
            .expect("answers within the bound")
            .expect("no transport error");
        assert!(answer.is_ok());
        assert!(started.elapsed() >= delay);
        sim.stop().await;
    }

    #[tokio::test]
    async fn shutdown_closes_connections_with_pending_requests() {
        let m = meters();
        m.set_fault(UnitId(1), Fault::Slow(Duration::from_secs(3600)));
        let sim = Running::start(m).await;
        let mut ctx = sim.connect(1).await;
        let pending = tokio::spawn(async move { ctx.read_input_registers(0, 2).await });
        tokio::time::sleep(NO_ANSWER).await;
        assert!(!pending.is_finished(), "slow unit answered early");
        sim.stop().await;
        let ended = timeout(PROMPT, pending)
            .await
            .expect("client sees the connection close")
            .expect("client task joins");
        assert!(ended.is_err(), "no answer after shutdown: {ended:?}");
    }
}
