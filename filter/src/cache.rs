//! The allow-decision cache: only *allow* answers, shared by every worker VM through
//! proxy-wasm shared data, bounded by construction, tied to the policy version.
//!
//! **Key.** SHA-256 over everything the filter tells the policy server except per-request
//! noise: route name and route context, peer principal, forwarded metadata (JWT claims),
//! source IP (not the port), method, path with query, host, scheme, every request header
//! except [`IGNORED_HEADERS`], the body size as reported (or "unknown"), whether the body
//! was cut, and the body bytes sent. A hit therefore means "the policy
//! server already allowed this exact request from this exact caller under this policy
//! version". Varying anything a caller controls only makes a miss, never a hit on someone
//! else's allow, and denies are never stored.
//!
//! **Bound.** The key picks one of `cache_max_entries` slots (`arbiter.cache.<n>`); a new
//! entry replaces whatever held the slot, so memory never grows past the slot count.
//!
//! **Invalidation.** Entries carry the policy version that allowed them; the filter
//! publishes the newest version it has seen under [`VERSION_KEY`] and an entry of any other
//! version is a miss. Entries also expire after the route's `cache_ttl_ms`.

use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::check::RequestInfo;
use crate::outcome::HeaderOp;

/// Shared-data key holding the newest policy version any worker has seen.
pub const VERSION_KEY: &str = "arbiter.policy_version";

/// Headers that change per request without saying anything about the caller or what it
/// asks for; leaving them out of the key is what makes a second identical request hit.
pub const IGNORED_HEADERS: &[&str] = &[
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-attempt-count",
];

/// A cache key: which slot, and the full digest stored in it to detect collisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    /// Shared-data key of the slot.
    pub slot: String,
    /// Hex SHA-256 of the request.
    pub digest: String,
}

/// Computes the key of a request.
pub fn key(
    info: &RequestInfo,
    context: &[(String, String)],
    metadata: Option<&[u8]>,
    body: Option<&[u8]>,
    partial: bool,
    slots: u32,
) -> CacheKey {
    let mut h = Sha256::new();
    let mut field = |tag: &str, value: &[u8]| {
        // Length-prefixed so no two different inputs concatenate the same way.
        h.update(tag.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value);
    };
    field("route", info.route_name.as_bytes());
    let mut ctx: Vec<&(String, String)> = context.iter().collect();
    ctx.sort();
    for (k, v) in ctx {
        field("ctx.k", k.as_bytes());
        field("ctx.v", v.as_bytes());
    }
    field(
        "principal",
        info.peer_principal.as_deref().unwrap_or("").as_bytes(),
    );
    field("metadata", metadata.unwrap_or_default());
    let source_ip = info
        .source_address
        .as_deref()
        .and_then(|s| s.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    field("source_ip", source_ip.as_bytes());
    let mut headers: Vec<&(String, String)> = info
        .headers
        .iter()
        .filter(|(k, _)| !IGNORED_HEADERS.contains(&k.as_str()))
        .collect();
    headers.sort();
    for (k, v) in headers {
        field("h.k", k.as_bytes());
        field("h.v", v.as_bytes());
    }
    // A cut body's bytes are the same for every longer body with that start: the size
    // and the cut are what tell those requests apart (a size policy must not be skipped).
    match info.body_size {
        Some(n) => field("size", &n.to_le_bytes()),
        None => field("size.unknown", b""),
    }
    field("partial", &[u8::from(partial)]);
    match body {
        Some(b) => field("body", b),
        None => field("nobody", b""),
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let slot = u64::from_le_bytes(first) % u64::from(slots.max(1));
    CacheKey {
        slot: format!("arbiter.cache.{slot}"),
        digest: hex::encode(digest),
    }
}

/// What a slot holds: one allow decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Full request digest.
    pub digest: String,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// Policy version that allowed the request.
    pub policy_version: String,
    /// Request headers the server asked to set: `(name, value, append)`.
    pub headers: Vec<(String, String, bool)>,
    /// Request headers the server asked to remove.
    pub remove: Vec<String>,
    /// Response headers the server asked to add.
    pub response_headers: Vec<(String, String, bool)>,
}

impl Entry {
    /// An entry for an allow at `now` lasting `ttl`.
    pub fn new(
        digest: String,
        now: SystemTime,
        ttl: Duration,
        policy_version: String,
        headers: &[HeaderOp],
        remove: &[String],
        response_headers: &[HeaderOp],
    ) -> Self {
        let ops = |v: &[HeaderOp]| {
            v.iter()
                .map(|o| (o.name.clone(), o.value.clone(), o.append))
                .collect()
        };
        Self {
            digest,
            expires_ms: millis(now)
                .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            policy_version,
            headers: ops(headers),
            remove: remove.to_vec(),
            response_headers: ops(response_headers),
        }
    }

    /// Serialised slot value: [`ENTRY_MAGIC`], then the digest, the expiry and the policy
    /// version, then the header lists, each string length-prefixed (no JSON to parse on
    /// every hit; the slot is only ever read by this module).
    pub fn encode(&self) -> Vec<u8> {
        let ops = |v: &[(String, String, bool)]| {
            v.iter()
                .map(|(n, val, _)| n.len() + val.len() + 9)
                .sum::<usize>()
        };
        let mut out = Vec::with_capacity(
            64 + self.digest.len()
                + self.policy_version.len()
                + ops(&self.headers)
                + ops(&self.response_headers)
                + self.remove.iter().map(|r| r.len() + 4).sum::<usize>(),
        );
        out.extend_from_slice(ENTRY_MAGIC);
        put_str(&mut out, &self.digest);
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        put_str(&mut out, &self.policy_version);
        put_ops(&mut out, &self.headers);
        put_len(&mut out, self.remove.len());
        for name in &self.remove {
            put_str(&mut out, name);
        }
        put_ops(&mut out, &self.response_headers);
        out
    }

    /// The entry in `slot` if it answers `digest` under `version` at `now`. The digest,
    /// version and expiry are judged before the header lists are read; a slot that does not
    /// parse (another format, cut, garbage) is a miss.
    pub fn lookup(
        slot: &[u8],
        digest: &str,
        version: Option<&str>,
        now: SystemTime,
    ) -> Option<Self> {
        let mut r = Reader(slot.strip_prefix(ENTRY_MAGIC)?);
        if r.str()? != digest {
            return None;
        }
        let expires_ms = r.u64()?;
        let policy_version = r.str()?;
        if Some(policy_version) != version || millis(now) >= expires_ms {
            return None;
        }
        let headers = r.ops()?;
        let remove = (0..r.len()?)
            .map(|_| r.str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()?;
        let response_headers = r.ops()?;
        r.0.is_empty().then(|| Entry {
            digest: digest.to_owned(),
            expires_ms,
            policy_version: policy_version.to_owned(),
            headers,
            remove,
            response_headers,
        })
    }

    /// Header operations to replay.
    pub fn header_ops(v: &[(String, String, bool)]) -> Vec<HeaderOp> {
        v.iter()
            .map(|(name, value, append)| HeaderOp {
                name: name.clone(),
                value: value.clone(),
                append: *append,
            })
            .collect()
    }
}

/// First bytes of a slot value in the current format.
const ENTRY_MAGIC: &[u8] = b"arbiter-cache-1\0";

fn put_len(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Header names and values are far below 4 GiB; a longer one could not be stored whole,
    // so it is cut to an empty string and the entry no longer parses (a miss).
    match u32::try_from(s.len()) {
        Ok(_) => {
            put_len(out, s.len());
            out.extend_from_slice(s.as_bytes());
        }
        Err(_) => put_len(out, usize::MAX),
    }
}

fn put_ops(out: &mut Vec<u8>, ops: &[(String, String, bool)]) {
    put_len(out, ops.len());
    for (name, value, append) in ops {
        put_str(out, name);
        put_str(out, value);
        out.push(u8::from(*append));
    }
}

/// Reads a slot value; every read is bounds-checked (`None` past the end).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn len(&mut self) -> Option<usize> {
        let b: [u8; 4] = self.take(4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    }

    fn u64(&mut self) -> Option<u64> {
        let b: [u8; 8] = self.take(8)?.try_into().ok()?;
        Some(u64::from_le_bytes(b))
    }

    fn str(&mut self) -> Option<&'a str> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).ok()
    }

    fn ops(&mut self) -> Option<Vec<(String, String, bool)>> {
        let n = self.len()?;
        // Each op takes at least 9 bytes: a count beyond what is left is garbage.
        if n > self.0.len() / 9 {
            return None;
        }
        let mut ops = Vec::with_capacity(n);
        for _ in 0..n {
            let name = self.str()?.to_owned();
            let value = self.str()?.to_owned();
            let append = match self.take(1)? {
                [0] => false,
                [1] => true,
                _ => return None,
            };
            ops.push((name, value, append));
        }
        Some(ops)
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(caller: &str, path: &str) -> RequestInfo {
        RequestInfo {
            headers: vec![
                (":path".into(), path.into()),
                (":method".into(), "POST".into()),
                ("x-request-id".into(), format!("{caller}{path}")),
                ("x-tenant-id".into(), "t1".into()),
            ],
            route_name: "chat".into(),
            source_address: Some("10.0.0.1:1000".into()),
            peer_principal: Some(caller.into()),
            ..RequestInfo::default()
        }
    }

    #[test]
    fn same_request_same_key_regardless_of_noise() {
        let a = info("spiffe://a", "/v1/chat/completions");
        let mut b = a.clone();
        b.headers.reverse();
        b.headers
            .push(("traceparent".into(), "00-abc-def-01".into()));
        b.source_address = Some("10.0.0.1:2000".into());
        b.headers.iter_mut().for_each(|(k, v)| {
            if k == "x-request-id" {
                *v = "other".into()
            }
        });
        assert_eq!(
            key(&a, &[], None, None, false, 100),
            key(&b, &[], None, None, false, 100)
        );
    }

    #[test]
    fn anything_the_policy_sees_changes_the_key() {
        let base = info("spiffe://a", "/v1/chat/completions");
        let k =
            |i: &RequestInfo, ctx: &[(String, String)], md: Option<&[u8]>, body: Option<&[u8]>| {
                key(i, ctx, md, body, false, 1_000_000).digest
            };
        let reference = k(&base, &[], None, None);
        assert_ne!(
            reference,
            k(&info("spiffe://b", "/v1/chat/completions"), &[], None, None),
            "caller"
        );
        let mut other_route = base.clone();
        other_route.route_name = "embeddings".into();
        assert_ne!(reference, k(&other_route, &[], None, None), "route");
        let mut tenant = base.clone();
        tenant.headers[3].1 = "t2".into();
        assert_ne!(
            reference,
            k(&tenant, &[], None, None),
            "a header policy may read"
        );
        let mut ip = base.clone();
        ip.source_address = Some("10.0.0.2:1000".into());
        assert_ne!(reference, k(&ip, &[], None, None), "source ip");
        assert_ne!(
            reference,
            k(&base, &[("c".into(), "v".into())], None, None),
            "route context"
        );
        assert_ne!(
            reference,
            k(&base, &[], Some(b"claims"), None),
            "jwt claims"
        );
        assert_ne!(reference, k(&base, &[], None, Some(b"{}")), "body");
        assert_ne!(
            k(&base, &[], None, Some(b"")),
            k(&base, &[], None, None),
            "empty body vs none"
        );
        let mut sized = base.clone();
        sized.body_size = Some(10);
        let mut bigger = base.clone();
        bigger.body_size = Some(10_000_000);
        assert_ne!(
            k(&sized, &[], None, Some(b"0123456789")),
            k(&bigger, &[], None, Some(b"0123456789")),
            "same first bytes, another size"
        );
        assert_ne!(
            reference,
            k(&sized, &[], None, None),
            "known vs unknown size"
        );
        assert_ne!(
            key(&base, &[], None, Some(b"x"), true, 1_000_000),
            key(&base, &[], None, Some(b"x"), false, 1_000_000),
            "cut vs whole"
        );
    }

    #[test]
    fn entry_round_trip_version_and_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let op = HeaderOp {
            name: "x-arbiter-audit-id".into(),
            value: "a".into(),
            append: false,
        };
        let e = Entry::new(
            "d".into(),
            now,
            Duration::from_millis(500),
            "v1".into(),
            std::slice::from_ref(&op),
            &[],
            &[],
        );
        let bytes = e.encode();
        assert_eq!(Entry::lookup(&bytes, "d", Some("v1"), now), Some(e.clone()));
        assert_eq!(Entry::header_ops(&e.headers), vec![op]);
        assert!(
            Entry::lookup(&bytes, "other", Some("v1"), now).is_none(),
            "collision"
        );
        assert!(
            Entry::lookup(&bytes, "d", Some("v2"), now).is_none(),
            "new policy version"
        );
        assert!(
            Entry::lookup(&bytes, "d", None, now).is_none(),
            "unknown version"
        );
        assert!(
            Entry::lookup(&bytes, "d", Some("v1"), now + Duration::from_millis(500)).is_none(),
            "expired"
        );
        assert!(Entry::lookup(b"garbage", "d", Some("v1"), now).is_none());
        // The JSON slots of earlier module versions (shared data outlives a module reload)
        // are misses, not errors.
        let json = br#"{"digest":"d","expires_ms":100500,"policy_version":"v1","headers":[],"remove":[],"response_headers":[]}"#;
        assert!(Entry::lookup(json, "d", Some("v1"), now).is_none());
        // A cut slot is a miss.
        for n in 0..bytes.len() {
            assert!(
                Entry::lookup(&bytes[..n], "d", Some("v1"), now).is_none(),
                "{n}"
            );
        }
    }

    #[test]
    fn slots_are_bounded() {
        let mut slots = std::collections::HashSet::new();
        for i in 0..1000 {
            slots.insert(
                key(
                    &info(&format!("spiffe://{i}"), "/"),
                    &[],
                    None,
                    None,
                    false,
                    16,
                )
                .slot,
            );
        }
        assert!(slots.len() <= 16);
    }
}
