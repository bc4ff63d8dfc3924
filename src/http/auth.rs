//! Credentials for the HTTP endpoints: basic auth against bcrypt hashes (exporter-toolkit's
//! `basic_auth_users`) and, our extension, a bearer token read from a file.
//!
//! - bcrypt compares in constant time. It is slow on purpose (about 70 ms at cost 10), so the
//!   outcome of a check is cached under a SHA-256 of (user, hash, presented password): a scrape
//!   with the same credentials costs one hash lookup, and so does a flood repeating the same
//!   wrong password (a password wrong for a hash stays wrong).
//! - bcrypt runs on the blocking pool, one check at a time. Checks wait in lanes ([`lanes`]):
//!   one per configured user, one shared by all unknown names, each holding at most
//!   [`lanes::LANE`] waiting checks, served in turn. Past that, a request is answered 429 at
//!   once ([`Verdict::Busy`]), for that lane only. A flood of distinct wrong passwords so costs
//!   one core at most, never queues without bound, never stalls the async workers (drain loop,
//!   scrapes, `/healthz`), and cannot shut out another user: a check in a lane of its own waits
//!   for at most one check per lane.
//! - An unknown user is checked against a dummy hash, so response time does not tell which
//!   users exist.
//! - The bearer token is compared as SHA-256 digests with a constant-time equality. Its file is
//!   read again when it changes (checked on each request), so a rotated token works at once.
//! - Nothing presented by a client is logged.

mod lanes;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use super::tls::{stamp, Stamp};

/// Successful basic-auth checks remembered; the set is emptied when it is full.
const CACHE_CAPACITY: usize = 256;
/// Failed basic-auth checks remembered; the set is emptied when it is full.
const REJECTED_CAPACITY: usize = 4096;
pub use lanes::LANE;

/// The outcome of checking a request's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    /// Too many password checks in progress: try again shortly (429).
    Busy,
}

impl From<bool> for Verdict {
    fn from(ok: bool) -> Verdict {
        if ok {
            Verdict::Allowed
        } else {
            Verdict::Denied
        }
    }
}

/// A configured user.
struct Account {
    hash: String,
    /// Its own lane of bcrypt checks.
    lane: usize,
}

pub struct Authenticator {
    users: BTreeMap<String, Account>,
    /// The lane shared by unknown user names (the last).
    unknown_lane: usize,
    /// Checked for unknown users, at the cheapest cost among the configured hashes.
    dummy_hash: String,
    bearer: Option<BearerFile>,
    cache: Mutex<HashSet<[u8; 32]>>,
    rejected: Mutex<HashSet<[u8; 32]>>,
    /// One bcrypt check at a time, taken in turn by the lanes.
    bcrypt: Arc<lanes::Lanes>,
    /// `WWW-Authenticate` values of a 401.
    pub challenges: Vec<HeaderValue>,
}

impl Authenticator {
    /// `users` are validated bcrypt hashes; the token file is read now (an error stops the start).
    pub fn new(
        users: BTreeMap<String, String>,
        bearer_token_file: Option<PathBuf>,
    ) -> Result<Authenticator, String> {
        let bearer = bearer_token_file.map(BearerFile::new).transpose()?;
        let cost = users
            .values()
            .filter_map(|h| h.parse::<bcrypt::HashParts>().ok())
            .map(|p| p.get_cost())
            .min()
            .unwrap_or(bcrypt::DEFAULT_COST);
        let dummy_hash = bcrypt::hash("not a password", cost).unwrap_or_default();
        let mut challenges = Vec::new();
        if !users.is_empty() {
            challenges.push(HeaderValue::from_static(
                "Basic realm=\"cpa-usage-exporter\", charset=\"UTF-8\"",
            ));
        }
        if bearer.is_some() {
            challenges.push(HeaderValue::from_static(
                "Bearer realm=\"cpa-usage-exporter\"",
            ));
        }
        let unknown_lane = users.len();
        let users = users
            .into_iter()
            .enumerate()
            .map(|(lane, (user, hash))| (user, Account { hash, lane }))
            .collect();
        Ok(Authenticator {
            users,
            unknown_lane,
            dummy_hash,
            bearer,
            cache: Mutex::new(HashSet::new()),
            rejected: Mutex::new(HashSet::new()),
            bcrypt: lanes::Lanes::new(unknown_lane + 1),
            challenges,
        })
    }

    /// Whether the request carries valid credentials.
    pub async fn check(&self, headers: &HeaderMap) -> Verdict {
        let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Verdict::Denied;
        };
        let Some((scheme, credentials)) = value.trim().split_once(' ') else {
            return Verdict::Denied;
        };
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return self
                .bearer
                .as_ref()
                .is_some_and(|b| b.matches(credentials.as_bytes()))
                .into();
        }
        if !scheme.eq_ignore_ascii_case("basic") || self.users.is_empty() {
            return Verdict::Denied;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
            return Verdict::Denied;
        };
        let Some(colon) = decoded.iter().position(|b| *b == b':') else {
            return Verdict::Denied;
        };
        let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
        let Ok(user) = std::str::from_utf8(user) else {
            return Verdict::Denied;
        };
        self.basic(user, password).await
    }

    /// [`Authenticator::check`] as a yes or no (busy counts as no).
    pub async fn allows(&self, headers: &HeaderMap) -> bool {
        self.check(headers).await == Verdict::Allowed
    }

    async fn basic(&self, user: &str, password: &[u8]) -> Verdict {
        let known = self.users.get(user);
        let (hash, lane) =
            known.map_or((&self.dummy_hash, self.unknown_lane), |a| (&a.hash, a.lane));
        let hash = hash.clone();
        let key = cache_key(user, &hash, password);
        if known.is_some() && self.cache().contains(&key) {
            return Verdict::Allowed;
        }
        if lock(&self.rejected).contains(&key) {
            return Verdict::Denied;
        }
        let Some(turn) = self.bcrypt.turn(lane).await else {
            return Verdict::Busy;
        };
        let password = password.to_vec();
        let verified = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        let ok = verified && known.is_some();
        let (mut set, capacity) = if ok {
            (self.cache(), CACHE_CAPACITY)
        } else {
            (lock(&self.rejected), REJECTED_CAPACITY)
        };
        if set.len() >= capacity {
            set.clear();
        }
        set.insert(key);
        ok.into()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        lock(&self.cache)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// SHA-256 of the user, the hash it is checked against, and the presented password, each
/// length-prefixed so that no two different triples collide by concatenation.
fn cache_key(user: &str, hash: &str, password: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [user.as_bytes(), hash.as_bytes(), password] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

struct BearerState {
    digest: [u8; 32],
    stamp: Stamp,
    /// Stamp of a version that could not be read, so it is reported once.
    failed: Option<Stamp>,
}

struct BearerFile {
    path: PathBuf,
    state: Mutex<BearerState>,
}

impl BearerFile {
    fn new(path: PathBuf) -> Result<BearerFile, String> {
        let stamp = stamp(&path);
        let digest = read_token(&path)?;
        Ok(BearerFile {
            path,
            state: Mutex::new(BearerState {
                digest,
                stamp,
                failed: None,
            }),
        })
    }

    fn matches(&self, presented: &[u8]) -> bool {
        let now = stamp(&self.path);
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now != st.stamp && st.failed != Some(now) {
            match read_token(&self.path) {
                Ok(digest) => {
                    st.digest = digest;
                    st.stamp = now;
                    st.failed = None;
                    info!("bearer token file reloaded");
                }
                Err(e) => {
                    warn!("{e}; keeping the previous bearer token");
                    st.failed = Some(now);
                }
            }
        }
        let digest: [u8; 32] = Sha256::digest(presented).into();
        bool::from(digest.ct_eq(&st.digest))
    }
}

/// The SHA-256 of the token in `path` (surrounding whitespace removed). Errors name the file,
/// never its content.
fn read_token(path: &std::path::Path) -> Result<[u8; 32], String> {
    let text = std::fs::read(path)
        .map_err(|e| format!("bearer_token_file: cannot read {}: {e}", path.display()))?;
    let token = text.trim_ascii();
    if token.is_empty() {
        return Err(format!("bearer_token_file: {} is empty", path.display()));
    }
    Ok(Sha256::digest(token).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        header(&format!("Basic {b}"))
    }

    #[tokio::test]
    async fn basic_auth_checks_bcrypt_and_caches_only_successes() {
        let users = BTreeMap::from([("prom".to_owned(), bcrypt::hash("s3cret", 4).unwrap())]);
        let auth = Authenticator::new(users, None).unwrap();
        assert!(auth.allows(&basic("prom", "s3cret")).await);
        assert_eq!(auth.cache().len(), 1);
        assert!(auth.allows(&basic("prom", "s3cret")).await);
        assert!(!auth.allows(&basic("prom", "wrong")).await);
        assert!(!auth.allows(&basic("nobody", "s3cret")).await);
        assert!(!auth.allows(&basic("nobody", "not a password")).await);
        assert!(!auth.allows(&header("Basic !!!")).await);
        assert!(!auth.allows(&header("Bearer s3cret")).await);
        assert!(!auth.allows(&HeaderMap::new()).await);
        assert_eq!(auth.cache().len(), 1);
        assert_eq!(auth.challenges.len(), 1);
    }

    #[tokio::test]
    async fn a_repeated_wrong_password_is_checked_once_and_a_flood_fills_only_its_own_lane() {
        let users = BTreeMap::from([
            ("prom".to_owned(), bcrypt::hash("s3cret", 4).unwrap()),
            ("graf".to_owned(), bcrypt::hash("other", 4).unwrap()),
        ]);
        let auth = Arc::new(Authenticator::new(users, None).unwrap());
        assert_eq!(auth.check(&basic("prom", "wrong")).await, Verdict::Denied);
        assert_eq!(lock(&auth.rejected).len(), 1);
        // Hold the bcrypt slot: a remembered rejection is answered without it...
        let held = auth.bcrypt.turn(0).await.unwrap();
        assert_eq!(auth.check(&basic("prom", "wrong")).await, Verdict::Denied);
        // ...while new passwords queue in the user's lane, up to LANE of them; the next is
        // refused at once, the right password included...
        let check = |user: &'static str, password: String| {
            let auth = auth.clone();
            tokio::spawn(async move { auth.check(&basic(user, &password)).await })
        };
        let prom = auth.users["prom"].lane;
        let flood: Vec<_> = (0..LANE)
            .map(|i| check("prom", format!("guess-{i}")))
            .collect();
        while auth.bcrypt.waiting(prom) < LANE {
            tokio::task::yield_now().await;
        }
        assert_eq!(auth.check(&basic("prom", "s3cret")).await, Verdict::Busy);
        // ...but another user's first login and unknown names wait in lanes of their own.
        let graf = check("graf", "other".to_owned());
        let nobody = check("nobody", "other".to_owned());
        while auth.bcrypt.waiting(auth.users["graf"].lane) == 0
            || auth.bcrypt.waiting(auth.unknown_lane) == 0
        {
            tokio::task::yield_now().await;
        }
        drop(held);
        assert_eq!(graf.await.unwrap(), Verdict::Allowed);
        assert_eq!(nobody.await.unwrap(), Verdict::Denied);
        for f in flood {
            assert_eq!(f.await.unwrap(), Verdict::Denied);
        }
        assert_eq!(auth.check(&basic("prom", "s3cret")).await, Verdict::Allowed);
    }

    #[tokio::test]
    async fn the_bearer_token_is_reread_when_its_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first-token\n").unwrap();
        let auth = Authenticator::new(BTreeMap::new(), Some(path.clone())).unwrap();
        assert!(auth.allows(&header("Bearer first-token")).await);
        assert!(auth.allows(&header("bearer  first-token ")).await);
        assert!(!auth.allows(&header("Bearer first-toke")).await);
        assert!(!auth.allows(&basic("a", "first-token")).await);
        let next = dir.path().join("token.new");
        std::fs::write(&next, "second-token").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert!(auth.allows(&header("Bearer second-token")).await);
        assert!(!auth.allows(&header("Bearer first-token")).await);
        // A broken replacement keeps the token in force.
        std::fs::write(&path, "  \n").unwrap();
        assert!(auth.allows(&header("Bearer second-token")).await);
        let e = Authenticator::new(BTreeMap::new(), Some(dir.path().join("none")))
            .err()
            .unwrap();
        assert!(e.contains("bearer_token_file"), "{e}");
    }
}
