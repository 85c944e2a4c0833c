//! Who is calling: identity evidence read from the CheckRequest, and the Cedar principal it
//! resolves to in a bundle.
//!
//! Sources, strongest first (the first present wins; weaker evidence is then ignored):
//! 1. mTLS: the peer principal Envoy verified (`attributes.source.principal`, a SPIFFE ID)
//!    → `Arbiter::Caller::"<spiffe id>"`, with the attributes and groups the bundle's
//!    `entities.json` gives that id (none if it lists no such caller).
//! 2. JWT: claims Envoy's `jwt_authn` filter verified and put in dynamic metadata
//!    (`metadata_context.filter_metadata["envoy.filters.http.jwt_authn"]["jwt_payload"]`)
//!    → `Arbiter::Caller::"<iss>#<sub>"`, tenant and groups from the claims named in
//!    `bundle.toml` (`[jwt]`). A raw `authorization` header is never read.
//! 3. API key: the `x-api-key` header, hashed (SHA-256, hex) and looked up among the
//!    bundle's callers' `api_key_sha256` → that caller. An unknown key identifies nobody.
//! 4. Otherwise `Arbiter::Anonymous::"anonymous"`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{Entities, Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value as ProtoValue};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Dynamic metadata namespace of Envoy's JWT filter.
pub const JWT_AUTHN_NAMESPACE: &str = "envoy.filters.http.jwt_authn";
/// Key of the verified claims in that namespace (`payload_in_metadata: jwt_payload`).
pub const JWT_PAYLOAD_KEY: &str = "jwt_payload";
/// Header carrying an API key.
pub const API_KEY_HEADER: &str = "x-api-key";
/// Id of the anonymous principal.
pub const ANONYMOUS_ID: &str = "anonymous";

/// Why evidence cannot become a principal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// An entity type or attribute could not be built (a bug, or an id Cedar refuses).
    #[error("cannot build the principal: {0}")]
    Build(String),
}

/// How the principal was identified, as `context.identity_source` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// mTLS peer principal.
    Mtls,
    /// Verified JWT claims.
    Jwt,
    /// API key found in the bundle.
    ApiKey,
    /// No identity: the anonymous principal.
    None,
}

impl IdentitySource {
    /// `mtls`, `jwt`, `api_key` or `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mtls => "mtls",
            Self::Jwt => "jwt",
            Self::ApiKey => "api_key",
            Self::None => "none",
        }
    }
}

/// Verified JWT claims, as JSON.
pub type Claims = Map<String, Value>;

/// Identity evidence from one request. Holds no secret: the API key only as its hash.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    /// mTLS peer principal (SPIFFE ID), when non-empty.
    pub mtls: Option<String>,
    /// Claims `jwt_authn` verified.
    pub jwt: Option<Claims>,
    /// Hex SHA-256 of the `x-api-key` header value.
    pub api_key_sha256: Option<String>,
}

impl Identity {
    /// The evidence read from a request: its mTLS principal, the `jwt_authn` metadata
    /// namespace (`filter_metadata`) and the raw `x-api-key` value.
    pub fn from_parts(
        mtls: &str,
        filter_metadata: &HashMap<String, Struct>,
        api_key: Option<&[u8]>,
    ) -> Self {
        let jwt = filter_metadata
            .get(JWT_AUTHN_NAMESPACE)
            .and_then(|namespace| namespace.fields.get(JWT_PAYLOAD_KEY))
            .and_then(|payload| match &payload.kind {
                Some(Kind::StructValue(claims)) => Some(struct_to_json(claims)),
                _ => None,
            });
        Self {
            mtls: (!mtls.is_empty()).then(|| mtls.to_owned()),
            jwt,
            api_key_sha256: api_key.filter(|key| !key.is_empty()).map(api_key_sha256),
        }
    }

    /// The strongest evidence, for logs before the bundle resolves it: the SPIFFE ID,
    /// `<iss>#<sub>`, `api_key:<first 12 hex digits of its hash>` or `anonymous`.
    pub fn display(&self) -> String {
        if let Some(id) = &self.mtls {
            return id.clone();
        }
        if let Some(id) = self.jwt.as_ref().and_then(jwt_caller_id) {
            return id;
        }
        if let Some(hash) = &self.api_key_sha256 {
            return format!("api_key:{}", hash.get(..12).unwrap_or(hash));
        }
        ANONYMOUS_ID.to_owned()
    }
}

/// Hex SHA-256 of an API key, as `entities.json` lists it (`printf %s "$KEY" | sha256sum`).
pub fn api_key_sha256(key: &[u8]) -> String {
    hex::encode(Sha256::digest(key))
}

/// Caller id of a JWT: `<iss>#<sub>` (`#<sub>` without `iss`), `None` without a string
/// `sub`. The issuer keeps two identity providers' subjects apart, and `#` cannot occur in
/// an issuer URL, so the id cannot collide with a SPIFFE ID or another issuer's.
pub fn jwt_caller_id(claims: &Claims) -> Option<String> {
    let sub = claims.get("sub")?.as_str()?;
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    Some(format!("{iss}#{sub}"))
}

/// Which JWT claims carry the tenant and the groups (`[jwt]` in `bundle.toml`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Claim holding the tenant (a string). Default `tenant`.
    pub tenant_claim: String,
    /// Claim holding the groups (an array of strings, or one space-separated string).
    /// Default `groups`.
    pub groups_claim: String,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            tenant_claim: "tenant".to_owned(),
            groups_claim: "groups".to_owned(),
        }
    }
}

/// A claim by name; a dotted name not found as such is read as a path into nested objects
/// (`realm_access.roles`). Names with dots (`https://corp/groups`) are tried whole first.
fn claim<'a>(claims: &'a Claims, name: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(name) {
        return Some(value);
    }
    let mut parts = name.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

/// The Cedar entity types of the request model.
#[derive(Debug, Clone)]
pub struct EntityTypes {
    /// `Arbiter::Caller`.
    pub caller: EntityTypeName,
    /// `Arbiter::Anonymous`.
    pub anonymous: EntityTypeName,
    /// `Arbiter::Group`.
    pub group: EntityTypeName,
    /// `Arbiter::Action`.
    pub action: EntityTypeName,
    /// `Arbiter::Route`.
    pub route: EntityTypeName,
}

impl EntityTypes {
    /// Parses the type names.
    pub fn new() -> Result<Self, IdentityError> {
        let parse = |name: &str| {
            EntityTypeName::from_str(&format!("{}::{name}", crate::schema::NAMESPACE))
                .map_err(|e| IdentityError::Build(e.to_string()))
        };
        Ok(Self {
            caller: parse("Caller")?,
            anonymous: parse("Anonymous")?,
            group: parse("Group")?,
            action: parse("Action")?,
            route: parse("Route")?,
        })
    }

    /// `type::"id"`.
    pub fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    }
}

/// The principal of one request: its entity (attributes and every ancestor group) as the
/// per-request entity store holds it.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `Arbiter::Caller::"…"` or `Arbiter::Anonymous::"anonymous"`.
    pub uid: EntityUid,
    /// How it was identified.
    pub source: IdentitySource,
    /// The entity, ancestors included (transitively closed), as the request's store shares it.
    pub entity: Arc<cedar_policy_core::ast::Entity>,
    /// Its ancestors (groups), for scope lookups.
    pub ancestors: Vec<EntityUid>,
}

/// What a bundle knows about callers.
pub struct Directory<'a> {
    /// The bundle's entities (transitively closed).
    pub entities: &'a Entities,
    /// API-key hash → caller.
    pub api_keys: &'a HashMap<String, EntityUid>,
    /// JWT claim names.
    pub jwt: &'a JwtConfig,
    /// Entity type names.
    pub types: &'a EntityTypes,
}

impl Directory<'_> {
    /// Resolves `identity`, strongest evidence first.
    pub fn resolve(&self, identity: &Identity) -> Result<Principal, IdentityError> {
        if let Some(id) = &identity.mtls {
            return Ok(self.known_or_bare(
                EntityTypes::uid(&self.types.caller, id),
                IdentitySource::Mtls,
            ));
        }
        if let Some(claims) = &identity.jwt {
            // Verified claims without a subject identify nobody; weaker evidence decides.
            if let Some(id) = jwt_caller_id(claims) {
                return self.jwt_caller(EntityTypes::uid(&self.types.caller, &id), claims);
            }
            tracing::debug!("jwt claims without a string `sub` ignored");
        }
        if let Some(uid) = identity
            .api_key_sha256
            .as_ref()
            .and_then(|hash| self.api_keys.get(hash))
        {
            return Ok(self.known_or_bare(uid.clone(), IdentitySource::ApiKey));
        }
        let uid = EntityTypes::uid(&self.types.anonymous, ANONYMOUS_ID);
        Ok(Principal {
            entity: Arc::new(cedar_policy_core::ast::Entity::with_uid(
                uid.as_ref().clone(),
            )),
            uid,
            source: IdentitySource::None,
            ancestors: Vec::new(),
        })
    }

    /// The bundle's entity for `uid`, or one without attributes or groups.
    fn known_or_bare(&self, uid: EntityUid, source: IdentitySource) -> Principal {
        let (entity, ancestors) = match self.entities.get(&uid) {
            Some(entity) => (
                Arc::new(entity.as_ref().clone()),
                self.entities
                    .ancestors(&uid)
                    .map(|a| a.cloned().collect())
                    .unwrap_or_default(),
            ),
            None => (
                Arc::new(cedar_policy_core::ast::Entity::with_uid(
                    uid.as_ref().clone(),
                )),
                Vec::new(),
            ),
        };
        Principal {
            uid,
            source,
            entity,
            ancestors,
        }
    }

    fn jwt_caller(&self, uid: EntityUid, claims: &Claims) -> Result<Principal, IdentityError> {
        let mut attrs = HashMap::new();
        if let Some(Value::String(tenant)) = claim(claims, &self.jwt.tenant_claim) {
            attrs.insert(
                "tenant".to_owned(),
                RestrictedExpression::new_string(tenant.clone()),
            );
        }
        let groups: Vec<&str> = match claim(claims, &self.jwt.groups_claim) {
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            Some(Value::String(list)) => list.split_whitespace().collect(),
            _ => Vec::new(),
        };
        // Groups the claims name, plus their parents in the bundle (groups nest).
        let mut ancestors: HashSet<EntityUid> = HashSet::new();
        for group in groups {
            let group = EntityTypes::uid(&self.types.group, group);
            if let Some(parents) = self.entities.ancestors(&group) {
                ancestors.extend(parents.cloned());
            }
            ancestors.insert(group);
        }
        let entity = Entity::new(uid.clone(), attrs, ancestors.clone())
            .map_err(|e| IdentityError::Build(e.to_string()))?;
        let mut ancestors: Vec<EntityUid> = ancestors.into_iter().collect();
        ancestors.sort_by_key(ToString::to_string);
        Ok(Principal {
            uid,
            source: IdentitySource::Jwt,
            entity: Arc::new(entity.as_ref().clone()),
            ancestors,
        })
    }
}

/// `google.protobuf.Struct` as JSON (numbers are doubles, as in protobuf).
pub fn struct_to_json(value: &Struct) -> Claims {
    value
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), proto_to_json(v)))
        .collect()
}

fn proto_to_json(value: &ProtoValue) -> Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            Value::Array(list.values.iter().map(proto_to_json).collect())
        }
        Some(Kind::StructValue(s)) => Value::Object(struct_to_json(s)),
    }
}

/// JSON as a `google.protobuf.Struct` (the inverse, for building requests in tests and the
/// CLI). Non-object JSON gives an empty struct.
pub fn json_to_struct(value: &Value) -> Struct {
    let fields: BTreeMap<String, ProtoValue> = match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_proto(v)))
            .collect(),
        _ => BTreeMap::new(),
    };
    Struct {
        fields: fields.into_iter().collect(),
    }
}

fn json_to_proto(value: &Value) -> ProtoValue {
    use envoy_types::pb::google::protobuf::ListValue;
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(json_to_proto).collect(),
        }),
        Value::Object(_) => Kind::StructValue(json_to_struct(value)),
    };
    ProtoValue { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(value: Value) -> Claims {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn jwt_ids_are_issuer_scoped() {
        assert_eq!(
            jwt_caller_id(&claims(json!({"iss": "https://idp", "sub": "alice"}))).as_deref(),
            Some("https://idp#alice")
        );
        assert_eq!(
            jwt_caller_id(&claims(json!({"sub": "alice"}))).as_deref(),
            Some("#alice")
        );
        assert_eq!(jwt_caller_id(&claims(json!({"sub": 5}))), None);
    }

    #[test]
    fn claims_by_name_then_path() {
        let c = claims(json!({"https://corp/groups": ["a"], "realm": {"roles": ["b"]}}));
        assert_eq!(claim(&c, "https://corp/groups"), Some(&json!(["a"])));
        assert_eq!(claim(&c, "realm.roles"), Some(&json!(["b"])));
        assert_eq!(claim(&c, "realm.nope"), None);
    }

    #[test]
    fn metadata_round_trip() {
        let value =
            json!({"sub": "a", "n": 1.5, "groups": ["x", "y"], "o": {"k": null, "b": true}});
        let proto = json_to_struct(&value);
        assert_eq!(Value::Object(struct_to_json(&proto)), value);
    }

    #[test]
    fn evidence_from_parts() {
        let mut metadata = HashMap::new();
        let payload = json!({"jwt_payload": {"iss": "i", "sub": "s"}});
        metadata.insert(JWT_AUTHN_NAMESPACE.to_owned(), json_to_struct(&payload));
        let identity = Identity::from_parts("", &metadata, Some(b"key-1"));
        assert_eq!(identity.display(), "i#s");
        assert_eq!(identity.api_key_sha256, Some(api_key_sha256(b"key-1")));
        let identity = Identity::from_parts("spiffe://x", &metadata, None);
        assert_eq!(identity.display(), "spiffe://x");
        let identity = Identity::from_parts("", &HashMap::new(), Some(b"key-1"));
        assert!(identity.display().starts_with("api_key:"));
        assert_eq!(identity.display().len(), "api_key:".len() + 12);
        let identity = Identity::from_parts("", &HashMap::new(), Some(b""));
        assert_eq!(identity.display(), "anonymous");
    }
}
