//! Shared test helpers.

pub mod bot;
pub mod browser;
pub mod failover;
pub mod fake_discord;
pub mod fake_gateway;
pub mod fake_slack;
pub mod fake_socket_mode;
pub mod forward;
pub mod net;
pub mod postgres;
pub mod process;
pub mod samba;
pub mod slapd;

/// Opens the store at `path` again once a raw sled handle a tamper step
/// used ([`open_raw_sled`]) has let go of the directory: its drop finishes
/// a flush on a thread of its own, holding the lock a moment longer.
pub fn reopen_store(path: impl AsRef<std::path::Path>) -> jitbot::store::Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match jitbot::store::Store::open(path.as_ref(), 16) {
            Err(jitbot::store::StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            opened => return opened.expect("reopen the store"),
        }
    }
}

/// Opens a store's sled directory directly, for tests that tamper with it.
///
/// A store just dropped may still be finishing a flush on tokio's blocking
/// pool, holding the directory's lock for a moment: wait for it (up to 2 s)
/// instead of failing on the race.
pub fn open_raw_sled(path: impl AsRef<std::path::Path>) -> sled::Db {
    let path = path.as_ref();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        // Stores are compressed unless created before jitbot compressed
        // them; sled opens each only with the setting it was created with.
        let opened = match sled::Config::new().path(path).use_compression(true).open() {
            Err(sled::Error::Unsupported(why)) if why.contains("use_compression") => sled::open(path),
            other => other,
        };
        match opened {
            Ok(db) => return db,
            Err(sled::Error::Io(e)) if std::time::Instant::now() < deadline && is_lock_error(&e) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open {} with sled: {e}", path.display()),
        }
    }
}

fn is_lock_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("lock")
}
