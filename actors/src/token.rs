//! A PKCS#11 token (an HSM, or SoftHSM) that holds the OIDC signing keys,
//! so their private halves never enter the broker's memory: the broker
//! finds or makes a non-extractable EC P-256 key by label, reads its public
//! point for the JWKS, and asks the token for each ES256 signature.
//!
//! Sessions are pooled (HSM sessions are scarce, and one session runs one
//! operation at a time); one stays open for the process's life, since a
//! token logs the application out when its last session closes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use crate::keys::{signs_for, PROBE_MESSAGE};

/// DER of the OID of P-256 (1.2.840.10045.3.1.7), the curve every key
/// made here is on.
const P256: [u8; 10] = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

/// Where the token is and how to open it, from config.
#[derive(Clone)]
pub struct TokenSettings {
    /// The PKCS#11 module (`/usr/lib/softhsm/libsofthsm2.so`, a vendor's).
    pub module: PathBuf,
    /// The token's label, which names it whatever slot it sits in.
    pub token_label: String,
    /// The user PIN (read from a file or a variable; never logged).
    pub pin: String,
}

impl std::fmt::Debug for TokenSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSettings")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("PKCS#11 module {module}: {source}")]
    Module { module: String, source: Error },
    #[error("no initialised PKCS#11 token is labelled {0:?}")]
    NoToken(String),
    #[error("PKCS#11 login to token {label:?} refused: {source}")]
    Login { label: String, source: Error },
    #[error("no EC private key labelled {0:?} on the token")]
    NoKey(String),
    #[error("the token's key {0:?} is not a P-256 key this broker can publish")]
    NotP256(String),
    #[error("the token's key {0:?} is extractable or not sensitive: its private half could leave the token")]
    Exposed(String),
    #[error("the token's key {0:?} does not sign for its public key")]
    Mismatched(String),
    #[error("the token's key {0:?} is no longer the one the JWKS publishes")]
    Replaced(String),
    #[error(
        "the token refused the PIN; the broker stops logging in (restart it with the right PIN)"
    )]
    PinRefused,
    #[error("the broker closed its PKCS#11 session as it stopped")]
    Closed,
    #[error("the key's handle is from before the module was reopened")]
    Stale,
    #[error("PKCS#11: {0}")]
    Call(#[from] Error),
}

impl TokenError {
    /// True when the token itself may be gone (not a key that is wrong):
    /// reopening the module may find it again.
    pub fn may_be_lost(&self) -> bool {
        matches!(
            self,
            Self::NoToken(_) | Self::NoKey(_) | Self::Stale | Self::Call(_)
        )
    }
}

/// An opened token: the module, and the connection to the token that a
/// reopening replaces.
pub struct Token {
    pkcs11: Pkcs11,
    label: String,
    pin: AuthPin,
    /// Operations hold it for reading; reopening the module for writing,
    /// so it waits for them and they for it.
    connection: RwLock<Connection>,
    /// When the module was last reopened (Unix seconds): at most once per
    /// second, however many signatures fail at once.
    reopened_at: AtomicU64,
    /// Set when the token refused the PIN: no more logins, so the broker
    /// never locks the user PIN out by retrying it on every mint.
    pin_refused: AtomicBool,
    /// Set by [`Token::close`]: the module is finalized.
    closed: AtomicBool,
}

/// The token's slot and sessions, as one initialisation of the module
/// found them; `None` slot: the token was not there.
struct Connection {
    slot: Option<Slot>,
    /// Which opening of the module this is: object handles are only good
    /// within the one that gave them (a module reopened hands the same
    /// numbers out again, perhaps for other objects).
    generation: u64,
    /// Sessions not in use; taken for one operation, given back after.
    idle: Mutex<Vec<Session>>,
    /// Open while the connection lives: keeps the application logged in
    /// (a token logs it out when its last session closes). In a mutex
    /// only so the connection can be shared between threads.
    _anchor: Mutex<Option<Session>>,
}

impl Connection {
    /// No token: what is left when the module is closed or reopening.
    fn closed() -> Self {
        Self {
            slot: None,
            generation: 0,
            idle: Mutex::new(Vec::new()),
            _anchor: Mutex::new(None),
        }
    }

    /// Finds the token labelled `label` and logs in.
    fn open(
        pkcs11: &Pkcs11,
        label: &str,
        pin: &AuthPin,
        generation: u64,
    ) -> Result<Self, TokenError> {
        let slot = pkcs11
            .get_slots_with_token()?
            .into_iter()
            .find(|slot| {
                pkcs11
                    .get_token_info(*slot)
                    .is_ok_and(|info| info.token_initialized() && info.label().trim() == label)
            })
            .ok_or_else(|| TokenError::NoToken(label.to_owned()))?;
        let anchor = pkcs11.open_rw_session(slot)?;
        log_in(&anchor, pin).map_err(|source| TokenError::Login {
            label: label.to_owned(),
            source,
        })?;
        Ok(Self {
            slot: Some(slot),
            generation,
            idle: Mutex::new(Vec::new()),
            _anchor: Mutex::new(Some(anchor)),
        })
    }
}

/// A key on the token: its private handle and its public point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenKey {
    pub private: ObjectHandle,
    /// The opening of the module the handle is good in.
    generation: u64,
    /// Uncompressed SEC1: 0x04 ‖ x ‖ y.
    pub point: [u8; 65],
}

impl Token {
    /// Loads the module, finds the token by label and logs in; a wrong PIN
    /// or a missing token is an error here, at start.
    pub fn open(settings: &TokenSettings) -> Result<Self, TokenError> {
        let module = |source| TokenError::Module {
            module: settings.module.display().to_string(),
            source,
        };
        let pkcs11 = Pkcs11::new(&settings.module).map_err(module)?;
        // The module stays loaded for the process's life: the last handle
        // on it is dropped by whichever thread lets go of the key ring
        // last, a signer thread that may still be unloading it
        // (dlclose, its static destructors) while the main thread exits
        // and runs them too. We finalize it on stop (`close`); only the
        // process's exit unloads it, once.
        std::mem::forget(pkcs11.clone());
        initialize(&pkcs11).map_err(module)?;
        let label = settings.token_label.trim().to_owned();
        let pin = AuthPin::from(settings.pin.clone());
        let connection = Connection::open(&pkcs11, &label, &pin, 1)?;
        Ok(Self {
            pkcs11,
            label,
            pin,
            connection: RwLock::new(connection),
            reopened_at: AtomicU64::new(0),
            pin_refused: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    /// Closes every session and finalizes the module, once; later calls
    /// answer [`TokenError::Closed`]. Called when the broker stops (and on
    /// drop): a module left initialised is torn down by the process's exit
    /// in whatever order that runs, with signer threads perhaps still in it.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        *self.connection.write().unwrap_or_else(|p| p.into_inner()) = Connection::closed();
        if let Err(e) = self.pkcs11.clone().finalize() {
            tracing::warn!(token = %self.label, error = %e, "PKCS#11 finalize failed");
        }
    }

    /// Finalizes and initialises the module again, then finds the token
    /// and logs in anew: how a token that went away (unplugged, its
    /// service restarted, its files moved) is found when it is back, for
    /// a module that keeps a lost token lost until then. At most once a
    /// second; `false` when it was not due.
    pub fn reopen(&self) -> Result<bool, TokenError> {
        let now = crate::domain::now_unix();
        // Checked before the lock too: a failing signer thread that is not
        // due does not queue behind the signatures for the write lock.
        if self.reopened_at.load(Ordering::Relaxed) >= now {
            return Ok(false);
        }
        let mut connection = self.connection.write().unwrap_or_else(|p| p.into_inner());
        let due = self.reopened_at.load(Ordering::Relaxed) < now;
        if !due || self.closed.load(Ordering::SeqCst) || self.pin_refused.load(Ordering::SeqCst) {
            return Ok(false);
        }
        self.reopened_at.store(now, Ordering::Relaxed);
        let generation = connection.generation.max(1) + 1;
        *connection = Connection::closed();
        connection.generation = generation;
        // Not initialised (an earlier reopening failed half-way) is fine.
        let _ = self.pkcs11.clone().finalize();
        initialize(&self.pkcs11)?;
        tracing::warn!(token = %self.label, "PKCS#11 module reopened to find the token again");
        let opened = Connection::open(&self.pkcs11, &self.label, &self.pin, generation);
        *connection = opened.inspect_err(|e| {
            if matches!(e, TokenError::Login { source, .. } if refuses_pin(source)) {
                self.pin_refused.store(true, Ordering::SeqCst);
            }
        })?;
        Ok(true)
    }

    /// The token's label, for errors and logs.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Runs `work` on a session of the pool (a new one if none is idle).
    /// A session that failed is closed, not given back: the next call opens
    /// a fresh one.
    fn with_session<T>(
        &self,
        work: impl FnOnce(&Session, u64) -> Result<T, Error>,
    ) -> Result<T, TokenError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(TokenError::Closed);
        }
        let connection = self.connection.read().unwrap_or_else(|p| p.into_inner());
        let slot = connection
            .slot
            .ok_or_else(|| TokenError::NoToken(self.label.clone()))?;
        let idle = connection
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let session = match idle {
            Some(session) => session,
            None => {
                if self.pin_refused.load(Ordering::SeqCst) {
                    return Err(TokenError::PinRefused);
                }
                let session = self.pkcs11.open_rw_session(slot)?;
                if let Err(e) = log_in(&session, &self.pin) {
                    if refuses_pin(&e) {
                        self.pin_refused.store(true, Ordering::SeqCst);
                    }
                    return Err(e.into());
                }
                session
            }
        };
        let done = work(&session, connection.generation)?;
        connection
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(session);
        Ok(done)
    }

    /// The EC private key labelled `label` and its public point, checked:
    /// sensitive and never extractable, and signing for that point (a
    /// signature made now verifies against it), so the JWKS can only
    /// publish the half that matches.
    pub fn find_key(&self, label: &str) -> Result<TokenKey, TokenError> {
        let (private, point, exposed, generation) = self
            .with_session(|session, generation| {
                let found = find_key(session, label)?;
                Ok(found.map(|(private, point, exposed)| (private, point, exposed, generation)))
            })?
            .ok_or_else(|| TokenError::NoKey(label.to_owned()))?;
        if exposed {
            return Err(TokenError::Exposed(label.to_owned()));
        }
        let point = uncompressed(&point).ok_or_else(|| TokenError::NotP256(label.to_owned()))?;
        let key = TokenKey {
            private,
            generation,
            point,
        };
        let probe = PROBE_MESSAGE;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, probe);
        let digest: &[u8; 32] = digest.as_ref().try_into().expect("SHA-256 is 32 bytes");
        let signature = self.sign_digest(&key, digest)?;
        signs_for(&point, probe, &signature)
            .then_some(key)
            .ok_or_else(|| TokenError::Mismatched(label.to_owned()))
    }

    /// Makes an EC P-256 key pair labelled `label` on the token, its private
    /// half sensitive and never extractable; an existing key of that label
    /// is adopted instead (labels name keys across restarts and replicas).
    pub fn find_or_generate_key(&self, label: &str) -> Result<TokenKey, TokenError> {
        match self.find_key(label) {
            Err(TokenError::NoKey(_)) => {}
            found => return found,
        }
        self.with_session(|session, _| {
            let tag = label.as_bytes().to_vec();
            let public = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::KeyType(KeyType::EC),
                Attribute::EcParams(P256.to_vec()),
                Attribute::Label(tag.clone()),
                Attribute::Id(tag.clone()),
            ];
            let private = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sign(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Label(tag.clone()),
                Attribute::Id(tag),
            ];
            session
                .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
                .map(|_| ())
        })?;
        self.find_key(label)
    }

    /// An ECDSA signature over a SHA-256 `digest` by `key`: r ‖ s, the
    /// JOSE form (CKM_ECDSA signs exactly the 32 bytes it is given).
    pub fn sign_digest(&self, key: &TokenKey, digest: &[u8; 32]) -> Result<[u8; 64], TokenError> {
        let signature = self.with_session(|session, generation| {
            (generation == key.generation)
                .then(|| session.sign(&Mechanism::Ecdsa, key.private, digest))
                .transpose()
        })?;
        signature
            .ok_or(TokenError::Stale)?
            .try_into()
            .map_err(|_| TokenError::Call(Error::InvalidValue))
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        self.close();
    }
}

/// Initialises the module for several threads; already initialised (by
/// another user of the module in this process) is fine.
fn initialize(pkcs11: &Pkcs11) -> Result<(), Error> {
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// True when the token refused the PIN itself (not the connection).
fn refuses_pin(error: &Error) -> bool {
    matches!(
        error,
        Error::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, _)
    )
}

/// Logs `session`'s application in; already logged in (another session
/// did) is fine.
fn log_in(session: &Session, pin: &AuthPin) -> Result<(), Error> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, Function::Login)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The one private key labelled `label`, the public key of the same label
/// and CKA_ID, its EC point, and whether the private half could leave the
/// token (not sensitive, or extractable).
fn find_key(
    session: &Session,
    label: &str,
) -> Result<Option<(ObjectHandle, Vec<u8>, bool)>, Error> {
    let tag = label.as_bytes().to_vec();
    let private = session.find_objects(&[
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Label(tag.clone()),
    ])?;
    let [private] = private[..] else {
        return Ok(None);
    };
    let (mut id, mut sensitive, mut extractable) = (None, false, true);
    let wanted = [
        AttributeType::Id,
        AttributeType::Sensitive,
        AttributeType::Extractable,
    ];
    for attribute in session.get_attributes(private, &wanted)? {
        match attribute {
            Attribute::Id(value) => id = Some(value),
            Attribute::Sensitive(value) => sensitive = value,
            Attribute::Extractable(value) => extractable = value,
            _ => {}
        }
    }
    let mut template = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(KeyType::EC),
        Attribute::Label(tag),
    ];
    template.extend(id.map(Attribute::Id));
    let public = session.find_objects(&template)?;
    let [public] = public[..] else {
        return Ok(None);
    };
    let point = session
        .get_attributes(public, &[AttributeType::EcPoint])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(point) => Some(point),
            _ => None,
        });
    Ok(point.map(|point| (private, point, !sensitive || extractable)))
}

/// The 65-byte uncompressed point in a CKA_EC_POINT value: a DER OCTET
/// STRING around it (the standard form), or the bare point (some tokens).
fn uncompressed(value: &[u8]) -> Option<[u8; 65]> {
    let raw = match value {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest,
        [0x04, 0x81, 0x41, rest @ ..] if rest.len() == 65 => rest,
        bare if bare.len() == 65 => bare,
        _ => return None,
    };
    (raw[0] == 0x04).then(|| raw.try_into().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ec_point_is_read_wrapped_or_bare_and_only_uncompressed() {
        let mut point = [7u8; 65];
        point[0] = 0x04;
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend_from_slice(&point);
        assert_eq!(uncompressed(&wrapped), Some(point));
        assert_eq!(uncompressed(&point), Some(point));
        let mut long = vec![0x04, 0x81, 0x41];
        long.extend_from_slice(&point);
        assert_eq!(uncompressed(&long), Some(point));
        let mut compressed = point;
        compressed[0] = 0x02;
        assert_eq!(uncompressed(&compressed), None);
        assert_eq!(uncompressed(&point[..64]), None);
    }
}
