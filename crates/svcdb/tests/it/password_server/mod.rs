//! A stand-in for a PostgreSQL server that checks passwords, for the tests of what svcdb says
//! when one is missing or wrong. Used by `tests/it/connect.rs` and, through `#[path]`, by the
//! CLI's tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a server that checks passwords says: asks for a cleartext password, and refuses the
/// one it gets with 28P01, as PostgreSQL does. This machine's PostgreSQL trusts local
/// connections and never asks, so this stand-in speaks just that much of the protocol.
/// Returns its port and how many connections it accepted.
pub async fn password_checking_server() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // StartupMessage: length (itself included), then the rest.
                let len = socket.read_i32().await? as usize;
                let mut startup = vec![0; len - 4];
                socket.read_exact(&mut startup).await?;
                // AuthenticationCleartextPassword.
                socket.write_all(b"R\0\0\0\x08\0\0\0\x03").await?;
                // PasswordMessage ('p'), then the refusal.
                let _tag = socket.read_u8().await?;
                let len = socket.read_i32().await? as usize;
                let mut password = vec![0; len - 4];
                socket.read_exact(&mut password).await?;
                let mut fields = Vec::new();
                for (field, value) in [
                    (b'S', "FATAL"),
                    (b'V', "FATAL"),
                    (b'C', "28P01"),
                    (b'M', "password authentication failed for user \"svc\""),
                ] {
                    fields.push(field);
                    fields.extend_from_slice(value.as_bytes());
                    fields.push(0);
                }
                fields.push(0);
                let mut error = vec![b'E'];
                error.extend_from_slice(&(fields.len() as i32 + 4).to_be_bytes());
                error.extend_from_slice(&fields);
                socket.write_all(&error).await?;
                std::io::Result::Ok(())
            });
        }
    });
    (port, accepted)
}
