//! The Twilio leg's WebSocket layer alone: fastwebsockets (what the bridge uses) against
//! tokio-tungstenite (what it uses upstream), as the server side of the connection.
//!
//! One iteration is what each 20 ms of a call asks of this layer: read one Twilio `media`
//! text frame (masked, as a client sends it) and hand its text on, then write one `media` and
//! one `mark` frame and flush them together. Both libraries are used as the call task uses
//! fastwebsockets: split into a read half and a write half (tungstenite through
//! `StreamExt::split`), a 2 KiB buffer under fastwebsockets' writer (`TWILIO_WRITE_BUFFER`),
//! and tungstenite reading in 4 KiB (`UPSTREAM_READ_BUFFER`). Outbound texts are prepared once
//! and passed without copying (a borrowed payload, a shared `Utf8Bytes`), so what is timed is
//! the library's framing, masking, buffering and I/O calls.
//!
//! The peer is raw bytes: it writes a pre-masked frame and reads back the (identical) reply
//! bytes, the same work for both. Over `tokio::io::duplex` this is the libraries' CPU cost;
//! over loopback TCP it adds the system calls each one makes per frame.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fastwebsockets::{FragmentCollectorRead, Frame, OpCode, Payload, Role, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role as TRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

const STREAM_SID: &str = "MZ00000000000000000000000000000001";

/// What Twilio sends every 20 ms, masked as a client must.
fn masked_media_frame() -> Vec<u8> {
    use base64::Engine as _;
    let payload = base64::engine::general_purpose::STANDARD.encode([0x7Fu8; 160]);
    let text = format!(
        r#"{{"event":"media","sequenceNumber":"42","media":{{"track":"inbound","chunk":"41","timestamp":"820","payload":"{payload}"}},"streamSid":"{STREAM_SID}"}}"#
    );
    let key = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | 126];
    frame.extend_from_slice(&(text.len() as u16).to_be_bytes());
    frame.extend_from_slice(&key);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

/// What the bridge writes every 20 ms: a `media` and its `mark`.
fn outbound() -> (String, String) {
    use base64::Engine as _;
    let payload = base64::engine::general_purpose::STANDARD.encode([0xD5u8; 160]);
    (
        format!(
            r#"{{"event":"media","streamSid":"{STREAM_SID}","media":{{"payload":"{payload}"}}}}"#
        ),
        format!(r#"{{"event":"mark","streamSid":"{STREAM_SID}","mark":{{"name":"0:1:20"}}}}"#),
    )
}

/// Unmasked server frames: header (2 or 4 bytes) plus payload.
fn reply_len(media: &str, mark: &str) -> usize {
    let header = |len: usize| if len < 126 { 2 } else { 4 };
    header(media.len()) + media.len() + header(mark.len()) + mark.len()
}

/// The server side under test: one iteration's work.
trait TwilioLeg {
    async fn read_text(&mut self) -> usize;
    async fn write_pair(
        &mut self,
        media: &str,
        mark: &str,
        media_u: &Utf8Bytes,
        mark_u: &Utf8Bytes,
    );
}

struct Fast<S: AsyncRead + AsyncWrite + Unpin> {
    read: FragmentCollectorRead<tokio::io::ReadHalf<S>>,
    write: fastwebsockets::WebSocketWrite<tokio::io::BufWriter<tokio::io::WriteHalf<S>>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Fast<S> {
    fn new(stream: S) -> Self {
        let mut ws = WebSocket::after_handshake(stream, Role::Server);
        ws.set_auto_pong(false);
        ws.set_auto_close(false);
        let (read, write) = ws.split(|stream| {
            let (read, write) = tokio::io::split(stream);
            (read, tokio::io::BufWriter::with_capacity(2 * 1024, write))
        });
        Self {
            read: FragmentCollectorRead::new(read),
            write,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TwilioLeg for Fast<S> {
    async fn read_text(&mut self) -> usize {
        let mut never_writes = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
        let frame = self.read.read_frame(&mut never_writes).await.expect("read");
        assert_eq!(frame.opcode, OpCode::Text);
        std::str::from_utf8(&frame.payload).expect("utf-8").len()
    }

    async fn write_pair(&mut self, media: &str, mark: &str, _: &Utf8Bytes, _: &Utf8Bytes) {
        let write = &mut self.write;
        write
            .write_frame(Frame::text(Payload::Borrowed(media.as_bytes())))
            .await
            .expect("write");
        write
            .write_frame(Frame::text(Payload::Borrowed(mark.as_bytes())))
            .await
            .expect("write");
        write.flush().await.expect("flush");
    }
}

type TungSink<S> = futures_util::stream::SplitSink<WebSocketStream<S>, Message>;
type TungStream<S> = futures_util::stream::SplitStream<WebSocketStream<S>>;

struct Tung<S: AsyncRead + AsyncWrite + Unpin> {
    read: TungStream<S>,
    write: TungSink<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Tung<S> {
    async fn new(stream: S) -> Self {
        let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
        let ws = WebSocketStream::from_raw_socket(stream, TRole::Server, Some(config)).await;
        let (write, read) = ws.split();
        Self { read, write }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TwilioLeg for Tung<S> {
    async fn read_text(&mut self) -> usize {
        match self.read.next().await {
            Some(Ok(Message::Text(text))) => text.as_str().len(),
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn write_pair(&mut self, _: &str, _: &str, media: &Utf8Bytes, mark: &Utf8Bytes) {
        self.write
            .feed(Message::Text(media.clone()))
            .await
            .expect("write");
        self.write
            .feed(Message::Text(mark.clone()))
            .await
            .expect("write");
        self.write.flush().await.expect("flush");
    }
}

/// `iters` iterations of: the peer sends a frame, the leg reads it and writes the pair, the
/// peer reads the reply. Returns the time taken and the last reply.
async fn run<L: TwilioLeg, P: AsyncRead + AsyncWrite + Unpin>(
    leg: &mut L,
    peer: &mut P,
    iters: u64,
) -> (Duration, Vec<u8>) {
    let frame = masked_media_frame();
    let (media, mark) = outbound();
    let (media_u, mark_u) = (
        Utf8Bytes::from(media.clone()),
        Utf8Bytes::from(mark.clone()),
    );
    let mut reply = vec![0u8; reply_len(&media, &mark)];
    let started = Instant::now();
    for _ in 0..iters {
        peer.write_all(&frame).await.expect("peer write");
        black_box(leg.read_text().await);
        leg.write_pair(&media, &mark, &media_u, &mark_u).await;
        peer.read_exact(&mut reply).await.expect("peer read");
    }
    (started.elapsed(), reply)
}

async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let peer = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    server.set_nodelay(true).expect("nodelay");
    peer.set_nodelay(true).expect("nodelay");
    (server, peer)
}

fn ws_leg(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Both libraries produce the same bytes.
    rt.block_on(async {
        let (server, mut peer) = tokio::io::duplex(64 * 1024);
        let mut fast = Fast::new(server);
        let (server, mut peer2) = tokio::io::duplex(64 * 1024);
        let mut tung = Tung::new(server).await;
        let (_, fast_reply) = run(&mut fast, &mut peer, 1).await;
        let (_, tung_reply) = run(&mut tung, &mut peer2, 1).await;
        assert_eq!(fast_reply, tung_reply);
    });

    let mut group = c.benchmark_group("twilio_leg_frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("fastwebsockets/duplex", |b| {
        let (server, mut peer) = tokio::io::duplex(64 * 1024);
        let mut leg = Fast::new(server);
        b.iter_custom(|iters| rt.block_on(run(&mut leg, &mut peer, iters)).0);
    });
    group.bench_function("tungstenite/duplex", |b| {
        let (server, mut peer) = tokio::io::duplex(64 * 1024);
        let mut leg = rt.block_on(Tung::new(server));
        b.iter_custom(|iters| rt.block_on(run(&mut leg, &mut peer, iters)).0);
    });
    group.bench_function("fastwebsockets/tcp", |b| {
        let (server, mut peer) = rt.block_on(tcp_pair());
        let mut leg = Fast::new(server);
        b.iter_custom(|iters| rt.block_on(run(&mut leg, &mut peer, iters)).0);
    });
    group.bench_function("tungstenite/tcp", |b| {
        let (server, mut peer) = rt.block_on(tcp_pair());
        let mut leg = rt.block_on(Tung::new(server));
        b.iter_custom(|iters| rt.block_on(run(&mut leg, &mut peer, iters)).0);
    });
    group.finish();
}

criterion_group!(benches, ws_leg);
criterion_main!(benches);
