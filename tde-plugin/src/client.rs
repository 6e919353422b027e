//! A small blocking client for the sidecar's sockets, used by the mount and
//! the CLI.

use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::Context as _;
use tde_protocol::frame::{read_frame, write_frame};
use tde_protocol::{ErrorCode, Request, Response};

/// A refusal from the sidecar: its code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The error code.
    pub code: ErrorCode,
    /// The sidecar's message.
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for Refused {}

/// One connection to a sidecar socket.
pub struct Client {
    stream: UnixStream,
    next_id: u64,
}

impl Client {
    /// Connects to `path`.
    pub fn connect(path: &Path) -> anyhow::Result<Client> {
        let stream = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot connect to {}: is `tde serve` running, and is this the right socket (TDE_DATA_DIR / --config / --sidecar)?",
                path.display()
            )
        })?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
        Ok(Client {
            stream,
            next_id: u64::from(std::process::id()) << 32,
        })
    }

    /// Another handle on the connection's socket (to shut it down from
    /// another thread).
    pub fn stream_clone(&self) -> std::io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// Sends a request and returns the response, `Refused` for an error
    /// response.
    pub fn call(&mut self, req: &Request) -> anyhow::Result<Response> {
        self.next_id += 1;
        write_frame(&mut self.stream, &req.to_frame(self.next_id))
            .context("sending the request")?;
        let frame = read_frame(&mut self.stream)
            .context("reading the response")?
            .context("the sidecar closed the connection")?;
        if frame.header.request_id != self.next_id {
            anyhow::bail!("response to another request (id mismatch)");
        }
        match Response::from_frame(&frame).context("decoding the response")? {
            Response::Error { code, message } => Err(Refused { code, message }.into()),
            r => Ok(r),
        }
    }
}
