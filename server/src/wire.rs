//! The check every byte a client sends passes before pgwire decodes it.
//!
//! pgwire's decoders trust the lengths and counts inside a message (a `Bind` that claims more parameters than it
//! holds makes them read past the message and panic), take a `Query` string up to its first NUL and the bytes after it
//! as another message, and accept messages up to 1 GiB. [`serve`] therefore runs pgwire's message loop over the
//! client's stream wrapped in a guard ([`Guarded`], in the same task: no copy through another socket): the guard
//! frames each frontend message itself and checks its structure against the protocol before pgwire reads it, and
//! follows the frames of the server's messages as pgwire writes them:
//!
//! ```text
//!   startup phase (no type byte):  SSLRequest | GSSENCRequest | CancelRequest | StartupMessage --> tagged phase
//!   tagged phase:                  type byte, length, body: Q P B D C E S H X d c f p, each checked whole
//! ```
//!
//! A message that breaks the protocol, or is longer than `--max-message-bytes`, ends the connection with a
//! `FATAL 08P01` error response (written between two of the server's messages, never inside one), and never reaches
//! pgwire: pgwire reads the end of the stream. Everything else passes unchanged. pgwire writes straight into the
//! client's socket, so a client that reads slowly holds back its statement's worker (through the bounded row
//! channel, [`crate::exec::row_channel`]) once the socket's buffer is full.
//!
//! TLS sits below the guard: with a certificate configured ([`Tls`]), a client's `SSLRequest` is answered `S` and
//! the TLS handshake made before the guard sees a byte, so the guard frames the decrypted stream. `GSSENCRequest` is
//! answered `N` (the client then asks for TLS or goes on in plain). A plain startup is refused with `FATAL 28000`
//! when TLS is required. Without a certificate the guard answers `SSLRequest` and `GSSENCRequest` itself with `N`.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::{SinkExt, StreamExt};
use pgwire::api::{ClientInfo, DefaultClient, ErrorHandler, PgWireConnectionState, PgWireServerHandlers};
use pgwire::messages::PgWireFrontendMessage;
use pgwire::tokio::server::{PgWireMessageServerCodec, process_error, process_message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// Postgres' own bound on a startup packet.
const MAX_STARTUP_BYTES: usize = 10_000;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
/// How long a client may take to finish its startup (pgwire's own bound).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the last bytes of a closing connection may wait for a client that reads nothing.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The least room the guard makes in its buffer before reading from the client.
const READ_CHUNK: usize = 16 * 1024;

/// Serves one client: pgwire's message loop reading `tcp` through the guard. Returns when the connection is over.
pub async fn serve<H: PgWireServerHandlers>(
    mut tcp: TcpStream,
    max_message: usize,
    handlers: H,
    tls: Option<&Tls>,
) -> io::Result<()> {
    let peer = tcp.peer_addr()?;
    tcp.set_nodelay(true)?;
    let Some(tls) = tls else { return serve_over(tcp, peer, false, max_message, handlers).await };
    // The encryption requests come first, each 8 bytes: length 8 and the request's code.
    loop {
        let mut head = [0u8; 8];
        if !peek_exact(&tcp, &mut head).await? {
            return Ok(());
        }
        let length = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        match (length, code) {
            (8, GSSENC_REQUEST) => {
                tcp.read_exact(&mut head).await?;
                tcp.write_all(b"N").await?;
            }
            (8, SSL_REQUEST) => {
                tcp.read_exact(&mut head).await?;
                tcp.write_all(b"S").await?;
                let stream = tls.acceptor.accept(tcp).await?;
                return serve_over(stream, peer, true, max_message, handlers).await;
            }
            // A cancel request needs no encryption (it carries no secret but the key).
            (16, CANCEL_REQUEST) => return serve_over(tcp, peer, false, max_message, handlers).await,
            _ if tls.required => {
                tracing::warn!("refusing a connection without TLS (--tls-required)");
                let response = fatal_response("28000", "TLS is required: connect with sslmode=require or stronger");
                tcp.write_all(&response).await?;
                let _ = tcp.shutdown().await;
                return Ok(());
            }
            _ => return serve_over(tcp, peer, false, max_message, handlers).await,
        }
    }
}

/// The TLS the Postgres port speaks (`--tls-cert`, `--tls-key`), and whether clients must.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// Plain connections are refused (`--tls-required`).
    pub required: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("required", &self.required).finish_non_exhaustive()
    }
}

impl Tls {
    /// TLS with the certificate chain of PEM file `cert` and the private key of PEM file `key`.
    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path, required: bool) -> Result<Self, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("--tls-cert {}: no certificate in the file", cert.display()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("the TLS certificate and key: {e}"))?;
        Ok(Tls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), required })
    }
}

/// Fills `buf` with the next bytes of `tcp` without taking them; `false` if the client closed first.
async fn peek_exact(tcp: &TcpStream, buf: &mut [u8]) -> io::Result<bool> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let n = tcp.peek(buf).await?;
        if n == buf.len() {
            return Ok(true);
        }
        if n == 0 || tokio::time::Instant::now() > deadline {
            return Ok(false);
        }
        // Part of the message has come: the rest follows at once.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// pgwire's message loop over the client's `stream` through the guard ([`Guarded`]); `peer` is the client's address
/// and `secure` whether the stream is TLS.
async fn serve_over<H, S>(stream: S, peer: SocketAddr, secure: bool, max_message: usize, handlers: H) -> io::Result<()>
where
    H: PgWireServerHandlers,
    S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    let startup_handler = handlers.startup_handler();
    let simple_query_handler = handlers.simple_query_handler();
    let extended_query_handler = handlers.extended_query_handler();
    let copy_handler = handlers.copy_handler();
    let cancel_handler = handlers.cancel_handler();
    let error_handler = handlers.error_handler();
    let codec = PgWireMessageServerCodec::new(DefaultClient::new(peer, secure));
    let mut socket = Framed::new(Guarded::new(stream, max_message), codec);
    socket.set_state(PgWireConnectionState::AwaitingStartup);
    let startup_timeout = tokio::time::sleep(STARTUP_TIMEOUT);
    tokio::pin!(startup_timeout);
    loop {
        let starting = matches!(
            socket.state(),
            PgWireConnectionState::AwaitingStartup | PgWireConnectionState::AuthenticationInProgress
        );
        let message = match starting {
            true => tokio::select! {
                _ = &mut startup_timeout => None,
                message = socket.next() => message,
            },
            false => socket.next().await,
        };
        // The end of the client's messages, or of the checked ones: a message that broke the protocol never reaches
        // pgwire (the guard answers it).
        let Some(Ok(message)) = message else { break };
        // The client is leaving: it waits for the connection to close.
        if matches!(message, PgWireFrontendMessage::Terminate(_)) {
            break;
        }
        let extended = match socket.state() {
            PgWireConnectionState::CopyInProgress(extended) => extended,
            _ => message.is_extended_query(),
        };
        let processed = process_message(
            message,
            &mut socket,
            startup_handler.clone(),
            simple_query_handler.clone(),
            extended_query_handler.clone(),
            copy_handler.clone(),
            cancel_handler.clone(),
        )
        .await;
        if let Err(mut err) = processed {
            error_handler.on_error(&socket, &mut err);
            process_error(&mut socket, err, extended).await?;
        }
    }
    // What pgwire wrote and the guard's last reply go out before the connection closes (a client that reads nothing
    // does not hold it open).
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close()).await;
    Ok(())
}

/// A reply the guard owes the client, written between two of the server's messages.
#[derive(Debug)]
struct Reply {
    bytes: Vec<u8>,
    /// The connection ends after it.
    last: bool,
}

/// The server's messages a client needs no sooner than the reply to its next message, when that message has come
/// already: the acknowledgements of the extended protocol, descriptions, a statement's completion (`1 2 3 n t T C s I
/// S K`). A data row, an error, a notice, `ReadyForQuery`, an authentication request or anything of COPY is never
/// held back.
const DEFERRABLE: &[u8] = b"123ntTCsISK";

/// The most bytes of the server's messages the guard holds before writing them, whatever their kind.
const MAX_HELD: usize = 64 * 1024;

/// The client's stream as pgwire sees it.
///
/// Reading gives only whole messages the [`Framer`] checked, one per read (the end of the stream after one that
/// breaks the protocol, whose error the guard sends itself). Writing goes to a buffer that follows the frames of the
/// server's messages, so that a reply of the guard goes between two of them, and that is written to the socket when
/// pgwire flushes, except while everything in it is [`DEFERRABLE`] and the client's next message is here already:
/// then it goes with the answer to that message. A client sending Parse, Bind, Describe, Execute and Sync at once
/// gets its answer in two writes (the rows, `ReadyForQuery`) instead of five. Nothing waits while pgwire waits for the
/// client: the buffer is written before every read from the socket.
#[derive(Debug)]
struct Guarded<S> {
    client: S,
    framer: Framer,
    /// How many bytes at the front of the framer's buffer are checked and not yet read by pgwire.
    checked: usize,
    out: OutgoingFrames,
    /// The server's bytes (and the guard's replies) not yet written to the client.
    outgoing: BytesMut,
    /// `outgoing` holds a message that is not [`DEFERRABLE`].
    urgent: bool,
    replies: VecDeque<Reply>,
    /// The client's messages ended, or one broke the protocol: pgwire reads the end of the stream.
    ended: bool,
    /// The guard's last reply is in `outgoing`: nothing the server writes after it goes out.
    closing: bool,
    /// `outgoing` is written and the client's side shut after the last reply.
    closed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guarded<S> {
    fn new(client: S, max_message: usize) -> Self {
        Guarded {
            client,
            framer: Framer::new(max_message),
            checked: 0,
            out: OutgoingFrames::default(),
            outgoing: BytesMut::new(),
            urgent: false,
            replies: VecDeque::new(),
            ended: false,
            closing: false,
            closed: false,
        }
    }

    /// Moves the replies that wait into the outgoing bytes, while the server is between two messages.
    fn queue_replies(&mut self) {
        while !self.closing
            && self.out.between_messages()
            && let Some(reply) = self.replies.pop_front()
        {
            self.outgoing.extend_from_slice(&reply.bytes);
            self.urgent = true;
            self.closing = reply.last;
        }
    }

    /// Writes the outgoing bytes to the client (and shuts its side after the last reply).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.queue_replies();
        while !self.outgoing.is_empty() && !self.closed {
            let n = ready!(Pin::new(&mut self.client).poll_write(cx, &self.outgoing))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.advance(n);
        }
        self.urgent = false;
        if self.closing && !self.closed {
            ready!(Pin::new(&mut self.client).poll_shutdown(cx))?;
            self.closed = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.checked > 0 {
                let n = this.checked.min(buf.remaining());
                buf.put_slice(&this.framer.incoming[..n]);
                this.framer.incoming.advance(n);
                this.checked -= n;
                return Poll::Ready(Ok(()));
            }
            if this.ended || this.closed {
                // The end of the stream, once what is owed is out.
                ready!(this.poll_drain(cx))?;
                return Poll::Ready(Ok(()));
            }
            match this.framer.next() {
                Ok(Some(Frame::Forward(len))) => this.checked = len,
                Ok(Some(Frame::Answer(len, bytes))) => {
                    this.framer.incoming.advance(len);
                    this.replies.push_back(Reply { bytes, last: false });
                }
                Ok(None) => {
                    // Everything held goes out before waiting for the client.
                    ready!(this.poll_drain(cx))?;
                    let incoming = &mut this.framer.incoming;
                    if incoming.capacity() - incoming.len() < READ_CHUNK {
                        incoming.reserve(READ_CHUNK);
                    }
                    if ready!(tokio_util::io::poll_read_buf(Pin::new(&mut this.client), cx, incoming))? == 0 {
                        this.ended = true;
                    }
                }
                Err(message) => {
                    tracing::warn!(error = %message, "closing a connection that broke the protocol");
                    // Before the startup message the client expects no error response.
                    let bytes = if this.framer.tagged { error_response(&message) } else { Vec::new() };
                    this.replies.push_back(Reply { bytes, last: true });
                    this.ended = true;
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.outgoing.len() >= MAX_HELD {
            ready!(this.poll_drain(cx))?;
        }
        this.queue_replies();
        if this.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // With a reply waiting, take only up to the end of the message being written.
        let take = if this.replies.is_empty() { data.len() } else { this.out.until_boundary(data) };
        let urgent = &mut this.urgent;
        this.out.wrote(&data[..take], |kind| *urgent |= !DEFERRABLE.contains(&kind));
        this.outgoing.extend_from_slice(&data[..take]);
        Poll::Ready(Ok(take))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.queue_replies();
        if !this.urgent && this.framer.holds_a_message() {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        match this.closed {
            true => Poll::Ready(Ok(())),
            false => Pin::new(&mut this.client).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        match this.closed {
            true => Poll::Ready(Ok(())),
            false => Pin::new(&mut this.client).poll_shutdown(cx),
        }
    }
}

/// What to do with the next whole message from the client.
#[derive(Debug, PartialEq)]
enum Frame {
    /// Hand this many bytes on to the server.
    Forward(usize),
    /// Drop this many bytes and answer with these (an encryption request, which Weir declines).
    Answer(usize, Vec<u8>),
}

/// Frames and checks the client's messages.
#[derive(Debug)]
struct Framer {
    max_message: usize,
    /// Whether the startup message has passed: from then on every message starts with a type byte.
    tagged: bool,
    /// Bytes read from the client and not yet handed on.
    incoming: BytesMut,
}

impl Framer {
    fn new(max_message: usize) -> Self {
        Framer { max_message, tagged: false, incoming: BytesMut::new() }
    }

    /// Whether a whole tagged message waits (checked or not): the client sent its next message already.
    fn holds_a_message(&self) -> bool {
        let buf = &self.incoming[..];
        let length = read_i32(buf, 1).and_then(|len| usize::try_from(len).ok());
        self.tagged && length.is_some_and(|len| buf.len() > len)
    }

    /// The next message if it is complete and valid; `Ok(None)` when more bytes are needed.
    fn next(&mut self) -> Result<Option<Frame>, String> {
        let buf = &self.incoming[..];
        if !self.tagged {
            let Some(len) = read_i32(buf, 0) else { return Ok(None) };
            let len = usize::try_from(len).map_err(|_| "invalid length of startup packet".to_string())?;
            if !(8..=MAX_STARTUP_BYTES).contains(&len) {
                return Err("invalid length of startup packet".into());
            }
            if buf.len() < len {
                return Ok(None);
            }
            let code = read_i32(buf, 4).unwrap_or_default();
            return match code {
                SSL_REQUEST | GSSENC_REQUEST if len != 8 => Err("invalid length of encryption request".into()),
                SSL_REQUEST | GSSENC_REQUEST => Ok(Some(Frame::Answer(len, b"N".to_vec()))),
                CANCEL_REQUEST if !(12..=264).contains(&len) => Err("invalid length of cancel request".into()),
                version if version >> 16 == 3 => {
                    // Name and value pairs, each NUL-terminated, then a final NUL.
                    if buf[len - 1] != 0 {
                        return Err("invalid startup packet layout: expected terminator as last byte".into());
                    }
                    self.tagged = true;
                    Ok(Some(Frame::Forward(len)))
                }
                // Cancel requests, and protocol versions pgwire answers itself.
                _ => Ok(Some(Frame::Forward(len))),
            };
        }
        if buf.len() < 5 {
            return Ok(None);
        }
        let kind = buf[0];
        let len = read_i32(buf, 1).unwrap_or_default();
        let len = usize::try_from(len).ok().filter(|l| *l >= 4).ok_or("invalid message length")?;
        if len.saturating_add(1) > self.max_message {
            return Err(format!(
                "message of {} bytes is longer than the server accepts ({} bytes, weir --max-message-bytes)",
                len + 1,
                self.max_message
            ));
        }
        if buf.len() < len + 1 {
            return Ok(None);
        }
        check_body(kind, &buf[5..len + 1])?;
        Ok(Some(Frame::Forward(len + 1)))
    }
}

/// Checks one tagged frontend message's body against the layout of its type.
fn check_body(kind: u8, body: &[u8]) -> Result<(), String> {
    let mut body = Cursor { body, at: 0 };
    let what = match kind {
        b'Q' => {
            // One string: its NUL is the last byte, and the only one.
            if body.body.last() != Some(&0) || body.body[..body.body.len() - 1].contains(&0) {
                return Err("invalid Query message: the query string must end at the message's end".into());
            }
            return Ok(());
        }
        b'P' => {
            body.cstring()?;
            body.cstring()?;
            let types = body.u16()?;
            body.skip(4 * types)?;
            "Parse"
        }
        b'B' => {
            body.cstring()?;
            body.cstring()?;
            let formats = body.u16()?;
            for _ in 0..formats {
                body.format_code()?;
            }
            let parameters = body.u16()?;
            if formats > 1 && formats != parameters {
                return Err(format!("bind message has {formats} parameter formats but {parameters} parameters"));
            }
            for _ in 0..parameters {
                let len = body.i32()?;
                if len < -1 {
                    return Err("invalid parameter length in Bind message".into());
                }
                body.skip(usize::try_from(len).unwrap_or(0))?;
            }
            let results = body.u16()?;
            for _ in 0..results {
                body.format_code()?;
            }
            "Bind"
        }
        b'D' | b'C' => {
            let target = body.u8()?;
            if target != b'S' && target != b'P' {
                return Err(format!(
                    "invalid {} message subtype {target}",
                    if kind == b'D' { "DESCRIBE" } else { "CLOSE" }
                ));
            }
            body.cstring()?;
            if kind == b'D' { "Describe" } else { "Close" }
        }
        b'E' => {
            body.cstring()?;
            body.i32()?;
            "Execute"
        }
        b'S' => "Sync",
        b'H' => "Flush",
        b'X' => "Terminate",
        b'c' => "CopyDone",
        b'f' => {
            body.cstring()?;
            "CopyFail"
        }
        // Copy data and authentication responses are opaque here; their handlers read them whole.
        b'd' | b'p' => return Ok(()),
        other => return Err(format!("invalid frontend message type {other}")),
    };
    if body.at != body.body.len() {
        return Err(format!("invalid {what} message: {} bytes after its end", body.body.len() - body.at));
    }
    Ok(())
}

/// Reads a message body, failing instead of reading past it.
struct Cursor<'a> {
    body: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.body.len())
            .ok_or("message is shorter than its contents")?;
        let bytes = &self.body[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn skip(&mut self, n: usize) -> Result<(), String> {
        self.take(n).map(|_| ())
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<usize, String> {
        let bytes = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([bytes[0], bytes[1]])))
    }

    fn i32(&mut self) -> Result<i32, String> {
        let bytes = self.take(4)?;
        Ok(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn format_code(&mut self) -> Result<(), String> {
        let bytes = self.take(2)?;
        match i16::from_be_bytes([bytes[0], bytes[1]]) {
            0 | 1 => Ok(()),
            other => Err(format!("unsupported format code: {other}")),
        }
    }

    fn cstring(&mut self) -> Result<(), String> {
        let rest = &self.body[self.at..];
        let end = rest.iter().position(|b| *b == 0).ok_or("invalid string in message")?;
        std::str::from_utf8(&rest[..end]).map_err(|_| "invalid byte sequence for encoding \"UTF8\"".to_string())?;
        self.at += end + 1;
        Ok(())
    }
}

fn read_i32(buf: &[u8], at: usize) -> Option<i32> {
    let bytes = buf.get(at..at + 4)?;
    Some(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// A `FATAL` error response with SQLSTATE `08P01`.
fn error_response(message: &str) -> Vec<u8> {
    fatal_response("08P01", message)
}

/// A `FATAL` error response with SQLSTATE `code`, as bytes on the wire.
pub fn fatal_response(code: &str, message: &str) -> Vec<u8> {
    let mut fields = Vec::new();
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', message)] {
        fields.push(field);
        fields.extend_from_slice(value.replace('\0', "").as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&(fields.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(&fields);
    out
}

/// Follows the frames of the server's messages as they are written.
#[derive(Debug, Default, Clone)]
struct OutgoingFrames {
    /// The type byte and length of the message being written, as far as written.
    header: [u8; 5],
    header_len: usize,
    /// Body bytes of that message not yet written.
    remaining: usize,
}

impl OutgoingFrames {
    fn between_messages(&self) -> bool {
        self.header_len == 0 && self.remaining == 0
    }

    /// How many of `bytes` finish the message being written (all of them if they do not).
    fn until_boundary(&self, bytes: &[u8]) -> usize {
        let mut frames = self.clone();
        let mut at = 0;
        while at < bytes.len() {
            let step = match frames.remaining {
                0 => 5 - frames.header_len,
                remaining => remaining,
            }
            .min(bytes.len() - at);
            frames.wrote(&bytes[at..at + step], |_| {});
            at += step;
            if frames.between_messages() {
                return at;
            }
        }
        at
    }

    /// Follows `bytes` written; `kind` sees the type byte of every message they start.
    fn wrote(&mut self, mut bytes: &[u8], mut kind: impl FnMut(u8)) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.header_len == 0 {
                kind(bytes[0]);
            }
            let n = (5 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == 5 {
                let len = i32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]);
                self.remaining = usize::try_from(len).unwrap_or(4).saturating_sub(4);
                self.header_len = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn startup() -> Vec<u8> {
        let body = b"user\0weir\0\0";
        let mut out = ((body.len() + 8) as i32).to_be_bytes().to_vec();
        out.extend_from_slice(&196_608i32.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// The frames `bytes` make, up to the first error.
    fn frames(bytes: &[u8], max: usize) -> (Vec<Frame>, Option<String>) {
        let mut framer = Framer::new(max);
        framer.incoming.extend_from_slice(bytes);
        let mut frames = Vec::new();
        loop {
            match framer.next() {
                Ok(Some(frame)) => {
                    let len = match &frame {
                        Frame::Forward(len) | Frame::Answer(len, _) => *len,
                    };
                    framer.incoming.advance(len);
                    frames.push(frame);
                }
                Ok(None) => return (frames, None),
                Err(message) => return (frames, Some(message)),
            }
        }
    }

    #[test]
    fn valid_messages_pass_whole() {
        let mut ssl = 8i32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        let mut sent = ssl;
        sent.extend(startup());
        let messages = [
            message(b'Q', b"SELECT 1\0"),
            message(b'P', b"\0SELECT $1\0\0\x01\0\0\0\x17"),
            message(b'B', b"\0\0\0\x01\0\x01\0\x01\0\0\0\x011\0\0"),
            message(b'E', b"\0\0\0\0\0"),
            message(b'S', b""),
        ];
        for m in &messages {
            sent.extend_from_slice(m);
        }
        let (frames, error) = frames(&sent, 1 << 20);
        assert_eq!(error, None);
        let mut expected = vec![Frame::Answer(8, b"N".to_vec()), Frame::Forward(startup().len())];
        expected.extend(messages.iter().map(|m| Frame::Forward(m.len())));
        assert_eq!(frames, expected);
    }

    #[test]
    fn a_second_statement_after_the_nul_is_refused() {
        let mut sent = startup();
        sent.extend(message(b'Q', b"SELECT 1\0SELECT 2\0"));
        let (frames, error) = frames(&sent, 1 << 20);
        assert_eq!(frames.len(), 1, "only the startup message passes");
        assert!(error.is_some_and(|e| e.contains("must end at the message's end")));
    }

    #[test]
    fn lying_counts_long_messages_and_unknown_types_are_refused() {
        // A Bind that claims two parameters and holds one.
        let mut sent = startup();
        sent.extend(message(b'B', b"\0\0\0\0\0\x02\0\0\0\x011\0\0"));
        assert!(frames(&sent, 1 << 20).1.is_some_and(|e| e.contains("shorter than its contents")));

        let mut sent = startup();
        sent.extend(message(b'Q', &[b'x'; 200]));
        assert!(frames(&sent, 100).1.is_some_and(|e| e.contains("longer than the server accepts")));

        let mut sent = startup();
        sent.extend(message(b'F', b"\0\0\0\0"));
        assert!(frames(&sent, 1 << 20).1.is_some_and(|e| e.contains("invalid frontend message type")));

        let mut sent = startup();
        sent.extend(message(b'D', b"X\0"));
        assert!(frames(&sent, 1 << 20).1.is_some_and(|e| e.contains("subtype")));

        assert!(frames(&[0x7f, 0, 0, 0, 0, 3, 0, 0], 1 << 20).1.is_some());
        let error_bytes = error_response("bad");
        assert_eq!(error_bytes[0], b'E');
        assert!(String::from_utf8_lossy(&error_bytes).contains("08P01"));
    }

    /// Whether the client's end has bytes to read within 50 ms.
    async fn readable(client: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(50), client.read(&mut buf)).await {
            Ok(Ok(n)) => buf[..n].to_vec(),
            _ => Vec::new(),
        }
    }

    #[tokio::test]
    async fn acknowledgements_wait_for_the_answer_to_a_message_already_sent() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let mut guarded = Guarded::new(server, 1 << 20);
        let parse = message(b'P', b"\0SELECT 1\0\0\0");
        let mut sent = startup();
        sent.extend(&parse);
        sent.extend(message(b'S', b""));
        client_write.write_all(&sent).await.unwrap();
        // pgwire reads one whole message at a time.
        let mut buf = vec![0u8; 4096];
        assert_eq!(guarded.read(&mut buf).await.unwrap(), startup().len());
        assert_eq!(guarded.read(&mut buf).await.unwrap(), parse.len());
        assert_eq!(&buf[..parse.len()], &parse[..]);
        // ParseComplete, flushed while the Sync is here already: it waits for the answer to the Sync.
        guarded.write_all(&message(b'1', b"")).await.unwrap();
        guarded.flush().await.unwrap();
        assert!(readable(&mut client_read).await.is_empty());
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 5, "the Sync");
        let ready = message(b'Z', b"I");
        guarded.write_all(&ready).await.unwrap();
        guarded.flush().await.unwrap();
        let mut both = message(b'1', b"");
        both.extend(&ready);
        assert_eq!(readable(&mut client_read).await, both, "both in one write");

        // A data row goes out at once, whatever waits.
        client_write.write_all(&[message(b'E', b"\0\0\0\0\0"), message(b'S', b"")].concat()).await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 10, "the Execute");
        let row = message(b'D', b"\0\x01\0\0\0\x011");
        guarded.write_all(&row).await.unwrap();
        guarded.flush().await.unwrap();
        assert_eq!(readable(&mut client_read).await, row);

        // Nothing waits while pgwire reads from the socket: a held acknowledgement goes out first.
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 5, "the Sync");
        guarded.write_all(&message(b'C', b"SELECT 1\0")).await.unwrap();
        guarded.flush().await.unwrap();
        assert_eq!(readable(&mut client_read).await, message(b'C', b"SELECT 1\0"), "no message waits behind it");

        // A message that breaks the protocol: pgwire reads the end, the client gets the error, then the end.
        client_write.write_all(&message(b'F', b"")).await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 0);
        let error = readable(&mut client_read).await;
        assert_eq!(error[0], b'E');
        assert!(String::from_utf8_lossy(&error).contains("08P01"));
        assert!(guarded.write_all(&ready).await.is_err(), "nothing goes after the last reply");
    }

    #[test]
    fn replies_wait_for_the_end_of_the_servers_message() {
        let mut frames = OutgoingFrames::default();
        assert!(frames.between_messages());
        let mut written = message(b'D', b"\0\x01\0\0\0\x011");
        let first_len = written.len();
        written.extend(message(b'C', b"SELECT 1\0"));
        frames.wrote(&written[..3], |_| {});
        assert!(!frames.between_messages());
        assert_eq!(frames.until_boundary(&written[3..]), first_len - 3);
        frames.wrote(&written[3..], |_| {});
        assert!(frames.between_messages());
    }
}
