//! The check every byte a client sends passes before pgwire decodes it.
//!
//! pgwire's decoders trust the lengths and counts inside a message (a `Bind` that claims more parameters than it
//! holds makes them read past the message and panic), take a `Query` string up to its first NUL and the bytes after it
//! as another message, and accept messages up to 1 GiB. [`serve`] therefore puts a guard between the client's TCP
//! socket and pgwire (which gets the other end of a socket pair): the guard frames each frontend message itself and
//! checks its structure against the protocol before handing it on, and copies the server's bytes back, following
//! their frames:
//!
//! ```text
//!   startup phase (no type byte):  SSLRequest | GSSENCRequest | CancelRequest | StartupMessage --> tagged phase
//!   tagged phase:                  type byte, length, body: Q P B D C E S H X d c f p, each checked whole
//! ```
//!
//! A message that breaks the protocol, or is longer than `--max-message-bytes`, ends the connection with a
//! `FATAL 08P01` error response (written between two of the server's messages, never inside one), and never reaches
//! pgwire. Everything else passes unchanged. Its two socket buffers bound what a connection holds between a
//! statement's worker and a client that reads slowly.
//!
//! TLS sits below the guard: with a certificate configured ([`Tls`]), a client's `SSLRequest` is answered `S` and
//! the TLS handshake made before the guard sees a byte, so the guard frames the decrypted stream. `GSSENCRequest` is
//! answered `N` (the client then asks for TLS or goes on in plain). A plain startup is refused with `FATAL 28000`
//! when TLS is required. Without a certificate the guard answers `SSLRequest` and `GSSENCRequest` itself with `N`.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use pgwire::api::PgWireServerHandlers;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

/// Postgres' own bound on a startup packet.
const MAX_STARTUP_BYTES: usize = 10_000;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

/// Serves one client: pgwire on one end of a socket pair, the guard between it and `tcp`. Returns when the
/// connection is over.
pub async fn serve<H: PgWireServerHandlers>(
    mut tcp: TcpStream,
    max_message: usize,
    handlers: H,
    tls: Option<&Tls>,
) -> io::Result<()> {
    let Some(tls) = tls else { return serve_over(tcp, max_message, handlers).await };
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
                return serve_over(stream, max_message, handlers).await;
            }
            // A cancel request needs no encryption (it carries no secret but the key).
            (16, CANCEL_REQUEST) => return serve_over(tcp, max_message, handlers).await,
            _ if tls.required => {
                tracing::warn!("refusing a connection without TLS (--tls-required)");
                let response = fatal_response("28000", "TLS is required: connect with sslmode=require or stronger");
                tcp.write_all(&response).await?;
                let _ = tcp.shutdown().await;
                return Ok(());
            }
            _ => return serve_over(tcp, max_message, handlers).await,
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

/// pgwire on one end of a socket pair, the guard between it and the client's `stream`.
async fn serve_over<H, S>(stream: S, max_message: usize, handlers: H) -> io::Result<()>
where
    H: PgWireServerHandlers,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (server_end, guard_end) = UnixStream::pair()?;
    let served = pgwire::tokio::process_socket_unix(server_end, handlers);
    let (served, guarded) = tokio::join!(served, guard(stream, guard_end, max_message));
    served.and(guarded)
}

/// What the guard sends the client itself, between the server's messages.
#[derive(Debug)]
struct Reply {
    bytes: Vec<u8>,
    /// The connection ends after it.
    last: bool,
}

/// Copies checked messages from the client to the server and the server's bytes back; see the module docs.
async fn guard<S: AsyncRead + AsyncWrite + Unpin + Send>(
    client: S,
    server: UnixStream,
    max_message: usize,
) -> io::Result<()> {
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = server.into_split();
    let (replies, mut replies_due) = mpsc::unbounded_channel::<Reply>();
    let upstream = async move {
        let mut framer = Framer::new(max_message);
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            loop {
                match framer.next() {
                    Ok(Some(Frame::Forward(len))) => {
                        server_write.write_all(&framer.incoming[..len]).await?;
                        framer.incoming.advance(len);
                    }
                    Ok(Some(Frame::Answer(len, bytes))) => {
                        framer.incoming.advance(len);
                        let _ = replies.send(Reply { bytes, last: false });
                    }
                    Ok(None) => break,
                    Err(message) => {
                        tracing::warn!(error = %message, "closing a connection that broke the protocol");
                        // Before the startup message the client expects no error response.
                        let bytes = if framer.tagged { error_response(&message) } else { Vec::new() };
                        let _ = replies.send(Reply { bytes, last: true });
                        let _ = server_write.shutdown().await;
                        return Ok(());
                    }
                }
            }
            let n = client_read.read(&mut chunk).await?;
            if n == 0 {
                // The client is gone: the server sees the end of its input and finishes.
                let _ = server_write.shutdown().await;
                return Ok::<(), io::Error>(());
            }
            framer.incoming.extend_from_slice(&chunk[..n]);
        }
    };
    let downstream = async move {
        let mut frames = OutgoingFrames::default();
        let mut pending: VecDeque<Reply> = VecDeque::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut replies_open = true;
        loop {
            if send_replies(&mut client_write, &mut pending, &frames).await? {
                return Ok(());
            }
            tokio::select! {
                reply = replies_due.recv(), if replies_open => match reply {
                    Some(reply) => pending.push_back(reply),
                    None => replies_open = false,
                },
                n = server_read.read(&mut chunk) => {
                    let n = n?;
                    if n == 0 {
                        // The server ended the connection; anything the guard still owes the client goes first.
                        while let Ok(reply) = replies_due.try_recv() {
                            pending.push_back(reply);
                        }
                        for reply in pending {
                            client_write.write_all(&reply.bytes).await?;
                        }
                        let _ = client_write.shutdown().await;
                        return Ok(());
                    }
                    let mut data = &chunk[..n];
                    while !data.is_empty() {
                        // With a reply waiting, write only up to the end of the message being written.
                        let take = if pending.is_empty() { data.len() } else { frames.until_boundary(data) };
                        client_write.write_all(&data[..take]).await?;
                        frames.wrote(&data[..take]);
                        data = &data[take..];
                        if send_replies(&mut client_write, &mut pending, &frames).await? {
                            return Ok(());
                        }
                    }
                }
            }
        }
    };
    tokio::pin!(upstream, downstream);
    // The server's side ending ends the connection; the client's side ending (or breaking the protocol) lets the
    // server finish what it is sending first.
    tokio::select! {
        done = &mut downstream => done,
        done = &mut upstream => {
            done?;
            downstream.await
        }
    }
}

/// Writes the replies that wait, if the server is between two messages; whether the connection is to end (a reply
/// was the last), in which case the client's side is shut.
async fn send_replies(
    client: &mut (impl AsyncWrite + Unpin),
    pending: &mut VecDeque<Reply>,
    frames: &OutgoingFrames,
) -> io::Result<bool> {
    while frames.between_messages()
        && let Some(reply) = pending.pop_front()
    {
        client.write_all(&reply.bytes).await?;
        if reply.last {
            let _ = client.shutdown().await;
            return Ok(true);
        }
    }
    Ok(false)
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
            frames.wrote(&bytes[at..at + step]);
            at += step;
            if frames.between_messages() {
                return at;
            }
        }
        at
    }

    fn wrote(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
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

    #[test]
    fn replies_wait_for_the_end_of_the_servers_message() {
        let mut frames = OutgoingFrames::default();
        assert!(frames.between_messages());
        let mut written = message(b'D', b"\0\x01\0\0\0\x011");
        let first_len = written.len();
        written.extend(message(b'C', b"SELECT 1\0"));
        frames.wrote(&written[..3]);
        assert!(!frames.between_messages());
        assert_eq!(frames.until_boundary(&written[3..]), first_len - 3);
        frames.wrote(&written[3..]);
        assert!(frames.between_messages());
    }
}
