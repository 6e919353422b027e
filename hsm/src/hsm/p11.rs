//! The HSM's PKCS#11 token objects (see [`crate::pkcs11`]): who may see
//! and use which, and how they are kept. A token object (`CKA_TOKEN`
//! true) is sealed into the store like every other object (kind
//! [`KIND_P11_OBJECT`], named in the manifest); a session object lives in
//! memory only, bound to the login that made it, and ends with it.
//!
//! An object belongs to the crypto user that made it, who alone may use
//! it. A crypto officer sees every token object and may destroy or
//! relabel them, but uses none (as in CloudHSM).

use super::*;
use crate::pkcs11::{self, Attrs, Ckr, Entry, P11Object, ck};

/// Object kind: a PKCS#11 token object.
pub const KIND_P11_OBJECT: u8 = 5;

/// An object and how it is kept.
pub(super) struct Slot {
    pub(super) entry: Entry,
    /// Its store revision (token objects).
    pub(super) revision: u64,
    /// The login that made it (session objects); 0 for a token object.
    pub(super) session: u64,
}

impl Slot {
    fn view(&self, id: u64) -> P11Object {
        P11Object {
            id,
            attrs: self.entry.attrs.clone(),
        }
    }
}

fn store_id(id: u64) -> String {
    format!("{id:016x}")
}

fn not_found<T>() -> Result<T, HsmError> {
    Err(HsmError::Pkcs11(
        Ckr::CKR_OBJECT_HANDLE_INVALID,
        "no such object for this login".into(),
    ))
}

impl Hsm {
    pub(super) fn load_p11(&self, u: &mut Unsealed, obj: &StoredObject) {
        let id = u64::from_str_radix(&obj.id, 16).ok();
        let entry = u
            .sealer
            .open(obj.kind, &obj.id, obj.revision, &obj.blob)
            .and_then(|pt| pkcs11::decode(pt.expose()).ok())
            .filter(|e| e.is_token());
        match (id, entry) {
            (Some(id), Some(entry)) if store_id(id) == obj.id => {
                u.p11.insert(
                    id,
                    Slot {
                        entry,
                        revision: obj.revision,
                        session: 0,
                    },
                );
            }
            _ => self.mark_tampered(u, obj.kind, &obj.id, "failed authentication".into()),
        }
    }

    /// The object `id` as `by` may reach it from `session`: its own (or,
    /// for an officer, `officer_too`, any token object).
    fn p11_slot<'a>(
        u: &'a Unsealed,
        by: &OperatorSession,
        session: u64,
        id: u64,
        officer_too: bool,
    ) -> Result<&'a Slot, HsmError> {
        Self::check_live(u, by)?;
        let s = u.p11.get(&id).map_or_else(not_found, Ok)?;
        let mine = s.entry.owner == by.name && (s.session == 0 || s.session == session);
        let officer = officer_too && by.role == Role::CryptoOfficer && s.session == 0;
        if mine || officer { Ok(s) } else { not_found() }
    }

    /// The object for a cryptographic use: the caller's own, and the
    /// caller a crypto user.
    fn p11_use<'a>(
        u: &'a Unsealed,
        by: &OperatorSession,
        session: u64,
        id: u64,
    ) -> Result<&'a Slot, HsmError> {
        Self::check_session(u, by, Permission::UseKeys)?;
        Self::p11_slot(u, by, session, id, false)
    }

    /// The objects `by` sees from `session`: a crypto user its own, an
    /// officer every token object. Sorted by id.
    pub fn p11_list(&self, by: &OperatorSession, session: u64) -> Result<Vec<P11Object>, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        Self::check_live(u, by)?;
        if by.role == Role::Auditor {
            return Ok(Vec::new());
        }
        let officer = by.role == Role::CryptoOfficer;
        Ok(u.p11
            .iter()
            .filter(|(_, s)| {
                (s.entry.owner == by.name && (s.session == 0 || s.session == session))
                    || (officer && s.session == 0)
            })
            .map(|(id, s)| s.view(*id))
            .collect())
    }

    /// Installs a new object (persisting a token object first).
    fn p11_add(
        &self,
        by: &OperatorSession,
        session: u64,
        attrs: Attrs,
        material: pkcs11::Material,
    ) -> Result<P11Object, HsmError> {
        let mut st = self.write();
        let u = Self::unsealed_mut(&mut st)?;
        Self::check_session(u, by, Permission::UseKeys)?;
        let owned = u.p11.values().filter(|s| s.entry.owner == by.name).count();
        if owned >= pkcs11::MAX_OBJECTS {
            return Err(HsmError::Pkcs11(
                Ckr::CKR_DEVICE_MEMORY,
                format!(
                    "{} objects is the most one operator may have",
                    pkcs11::MAX_OBJECTS
                ),
            ));
        }
        let id = loop {
            let id = pkcs11::new_id()?;
            if !u.p11.contains_key(&id) {
                break id;
            }
        };
        let entry = Entry {
            owner: by.name.clone(),
            attrs,
            material,
        };
        let token = entry.is_token();
        if token {
            self.write_object(
                u,
                KIND_P11_OBJECT,
                &store_id(id),
                1,
                pkcs11::encode(&entry).expose(),
            )?;
        }
        let slot = Slot {
            entry,
            revision: 1,
            session: if token { 0 } else { session },
        };
        let view = slot.view(id);
        u.p11.insert(id, slot);
        Ok(view)
    }

    /// `C_CreateObject`: a certificate or a data object. Keys are made in
    /// the token, never given in the clear.
    pub fn p11_create(
        &self,
        by: &OperatorSession,
        session: u64,
        template: &Attrs,
    ) -> Result<P11Object, HsmError> {
        let class = template
            .iter()
            .find(|(t, _)| *t == ck::CKA_CLASS)
            .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_ne_bytes)
            .ok_or_else(|| HsmError::Pkcs11(Ckr::CKR_TEMPLATE_INCOMPLETE, "CKA_CLASS".into()))?;
        let (attrs, material) = match class {
            ck::CKO_CERTIFICATE | ck::CKO_DATA => (
                pkcs11::plain_object(class, template)?,
                pkcs11::Material::None,
            ),
            _ => {
                return Err(HsmError::Pkcs11(
                    Ckr::CKR_TEMPLATE_INCONSISTENT,
                    "private and public keys are generated in the token (C_GenerateKeyPair)".into(),
                ));
            }
        };
        self.p11_add(by, session, attrs, material)
    }

    /// `C_GenerateKey` (`CKM_AES_KEY_GEN`: one object) or
    /// `C_GenerateKeyPair` (public key, then private key).
    pub fn p11_generate(
        &self,
        by: &OperatorSession,
        session: u64,
        mechanism: u64,
        template: &Attrs,
        public_template: &Attrs,
    ) -> Result<Vec<P11Object>, HsmError> {
        self.authorize(by, Permission::UseKeys)?;
        if mechanism == ck::CKM_AES_KEY_GEN {
            let (attrs, material) = pkcs11::secret_key(template, None, Some(mechanism))?;
            return Ok(vec![self.p11_add(by, session, attrs, material)?]);
        }
        let (pub_attrs, priv_attrs, material) =
            pkcs11::key_pair(mechanism, public_template, template)?;
        let public = self.p11_add(by, session, pub_attrs, pkcs11::Material::None)?;
        match self.p11_add(by, session, priv_attrs, material) {
            Ok(private) => Ok(vec![public, private]),
            Err(e) => {
                let _ = self.p11_destroy(by, session, public.id);
                Err(e)
            }
        }
    }

    /// `C_UnwrapKey`: an AES key wrapped under `key` becomes a new object.
    #[allow(clippy::too_many_arguments)]
    pub fn p11_unwrap(
        &self,
        by: &OperatorSession,
        session: u64,
        key: u64,
        mechanism: u64,
        param: &[u8],
        wrapped: &[u8],
        template: &Attrs,
    ) -> Result<P11Object, HsmError> {
        let material = {
            let st = self.read();
            let u = Self::unsealed(&st)?;
            let kek = Self::p11_use(u, by, session, key).map_err(|e| match e {
                HsmError::Pkcs11(Ckr::CKR_OBJECT_HANDLE_INVALID, m) => {
                    HsmError::Pkcs11(Ckr::CKR_UNWRAPPING_KEY_HANDLE_INVALID, m)
                }
                e => e,
            })?;
            kek.entry.unwrap(mechanism, param, wrapped)?
        };
        let (attrs, material) = pkcs11::secret_key(template, Some(material), None)?;
        self.p11_add(by, session, attrs, material)
    }

    /// `C_DestroyObject`.
    pub fn p11_destroy(&self, by: &OperatorSession, session: u64, id: u64) -> Result<(), HsmError> {
        let mut st = self.write();
        let u = Self::unsealed_mut(&mut st)?;
        let token = Self::p11_slot(u, by, session, id, true)?.session == 0;
        if token {
            let list = u.manifest.without(KIND_P11_OBJECT, &store_id(id));
            let list_blob =
                u.sealer
                    .seal(KIND_MANIFEST, manifest::ID, list.revision, &list.encode())?;
            self.store.apply(&[
                StoreOp::Delete {
                    kind: KIND_P11_OBJECT,
                    id: store_id(id),
                },
                Self::put_op(KIND_MANIFEST, manifest::ID, list.revision, list_blob),
            ])?;
            u.manifest = list;
        }
        u.p11.remove(&id);
        Ok(())
    }

    /// `C_SetAttributeValue` (`CKA_LABEL`, `CKA_ID`).
    pub fn p11_set(
        &self,
        by: &OperatorSession,
        session: u64,
        id: u64,
        template: &Attrs,
    ) -> Result<P11Object, HsmError> {
        let mut st = self.write();
        let u = Self::unsealed_mut(&mut st)?;
        let s = Self::p11_slot(u, by, session, id, true)?;
        let attrs = s.entry.with_set(template)?;
        let revision = s.revision + 1;
        if s.session == 0 {
            let record = pkcs11::encode_parts(&s.entry.owner, &attrs, &s.entry.material);
            self.write_object(u, KIND_P11_OBJECT, &store_id(id), revision, record.expose())?;
        }
        let slot = u.p11.get_mut(&id).map_or_else(not_found, Ok)?;
        slot.entry.attrs = attrs;
        slot.revision = revision;
        Ok(slot.view(id))
    }

    /// `C_Encrypt` / `C_Decrypt` with a token or session object.
    #[allow(clippy::too_many_arguments)]
    pub fn p11_object_crypt(
        &self,
        by: &OperatorSession,
        session: u64,
        id: u64,
        encrypt: bool,
        mechanism: u64,
        param: &[u8],
        aad: &[u8],
        data: &[u8],
    ) -> Result<SecretBuf, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        Self::p11_use(u, by, session, id)?
            .entry
            .crypt(encrypt, mechanism, param, aad, data)
    }

    /// Whether a use of object `id` takes microseconds: an EC or AES key,
    /// or a public key (an RSA private key takes milliseconds). The
    /// sidecar runs such uses without handing them to a worker thread.
    /// Also `false` while a change holds the HSM (a key being made and
    /// stored), so that such a use does not wait for it on that task.
    pub fn p11_quick(&self, id: u64) -> bool {
        let Ok(st) = self.state.try_read() else {
            return false;
        };
        Self::unsealed(&st).is_ok_and(|u| {
            u.p11
                .get(&id)
                .is_some_and(|s| !matches!(s.entry.material, pkcs11::Material::Rsa(..)))
        })
    }

    /// `C_Sign`.
    pub fn p11_sign(
        &self,
        by: &OperatorSession,
        session: u64,
        id: u64,
        mechanism: u64,
        param: &[u8],
        data: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        Self::p11_use(u, by, session, id)?
            .entry
            .sign(mechanism, param, data)
    }

    /// `C_Verify`.
    #[allow(clippy::too_many_arguments)]
    pub fn p11_verify(
        &self,
        by: &OperatorSession,
        session: u64,
        id: u64,
        mechanism: u64,
        param: &[u8],
        data: &[u8],
        signature: &[u8],
    ) -> Result<(), HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        Self::p11_use(u, by, session, id)?
            .entry
            .verify(mechanism, param, data, signature)
    }

    /// `C_WrapKey`: `target` under `key`.
    pub fn p11_wrap(
        &self,
        by: &OperatorSession,
        session: u64,
        key: u64,
        mechanism: u64,
        param: &[u8],
        target: u64,
    ) -> Result<Vec<u8>, HsmError> {
        let st = self.read();
        let u = Self::unsealed(&st)?;
        let kek = Self::p11_use(u, by, session, key)?;
        let t = Self::p11_use(u, by, session, target)?;
        kek.entry.wrap(mechanism, param, &t.entry)
    }

    /// Ends the session objects of a login (its logout).
    pub fn p11_end_session(&self, session: u64) {
        let mut st = self.write();
        if let Ok(u) = Self::unsealed_mut(&mut st) {
            u.p11.retain(|_, s| s.session == 0 || s.session != session);
        }
    }

    /// An object's label, for the audit record (empty if it is gone).
    pub fn p11_label(&self, id: u64) -> String {
        let st = self.read();
        Self::unsealed(&st)
            .ok()
            .and_then(|u| u.p11.get(&id))
            .map(|s| s.entry.label())
            .unwrap_or_default()
    }
}
