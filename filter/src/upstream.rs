//! How the filter names the policy cluster to Envoy's gRPC client.
//!
//! `proxy_dispatch_grpc_call` takes either a cluster name or a serialized
//! `envoy.config.core.v3.GrpcService`. With a bare name, Envoy sends the name as the call's
//! `:authority`, and a name that is no valid authority breaks every call: Istio's
//! `outbound|50051||arbiter-policy.arbiter.svc.cluster.local` (`|` is not allowed there)
//! makes each Check fail with an HTTP/2 protocol error, so every request would get its
//! route's fail mode. For such names, and whenever `policy_authority` is set, the filter
//! passes a `GrpcService { envoy_grpc { cluster_name, authority } }` instead.
//!
//! The SDK takes the upstream as a `&str`, so the encoded message must be valid UTF-8: its
//! framing bytes are field tags and lengths, which stay below 0x80 while the inner message
//! is at most 127 bytes. Longer names are refused at configuration with that limit named.

/// Longest encoded `EnvoyGrpc` message the filter passes (its length is one varint byte).
const MAX_INNER: usize = 127;

/// Whether `s` can be sent as an HTTP/2 `:authority` (RFC 3986 host and port characters).
pub fn is_valid_authority(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'@'
                        | b'['
                        | b']'
                        | b'%'
                )
        })
}

/// The authority for an Istio-generated cluster name `outbound|PORT|SUBSET|HOST`: `HOST:PORT`.
fn istio_authority(cluster: &str) -> Option<String> {
    let mut parts = cluster.split('|');
    let (Some("outbound"), Some(port), Some(_subset), Some(host), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let authority = format!("{host}:{port}");
    (port.parse::<u16>().is_ok() && is_valid_authority(&authority)).then_some(authority)
}

/// What the filter passes to `dispatch_grpc_call` for `cluster`: the bare name when Envoy can
/// use it as the authority and none is configured, else an encoded `GrpcService`. The error
/// says what to configure.
pub fn policy_upstream(cluster: &str, authority: Option<&str>) -> Result<String, String> {
    let authority = match authority {
        Some(a) if !is_valid_authority(a) => {
            return Err(format!(
                "`policy_authority` `{a}` is not a valid :authority (host[:port])"
            ))
        }
        Some(a) => a.to_owned(),
        None if is_valid_authority(cluster) => return Ok(cluster.to_owned()),
        None => istio_authority(cluster).ok_or_else(|| {
            format!(
                "`policy_cluster` `{cluster}` cannot be sent as the gRPC :authority; \
                 set `policy_authority` (e.g. the policy server's host name)"
            )
        })?,
    };
    let inner_len = 2 + cluster.len() + 2 + authority.len();
    if cluster.len() > MAX_INNER || authority.len() > MAX_INNER || inner_len > MAX_INNER {
        return Err(format!(
            "`policy_cluster` and its :authority `{authority}` are {} bytes together; at most {} \
             fit (set a shorter `policy_authority`)",
            cluster.len() + authority.len(),
            MAX_INNER - 4
        ));
    }
    // GrpcService { envoy_grpc (1): EnvoyGrpc { cluster_name (1), authority (2) } }; every
    // length is < 0x80, so each is one varint byte and the bytes are the strings' own UTF-8.
    let mut out = String::with_capacity(2 + inner_len);
    out.push('\u{0a}');
    out.push(char::from(inner_len as u8));
    out.push('\u{0a}');
    out.push(char::from(cluster.len() as u8));
    out.push_str(cluster);
    out.push('\u{12}');
    out.push(char::from(authority.len() as u8));
    out.push_str(&authority);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Decodes what `policy_upstream` encodes with the real proto types.
    fn decode(upstream: &str) -> (String, String) {
        use prost::Message;
        #[derive(Clone, PartialEq, prost::Message)]
        struct EnvoyGrpc {
            #[prost(string, tag = "1")]
            cluster_name: String,
            #[prost(string, tag = "2")]
            authority: String,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct GrpcService {
            #[prost(message, optional, tag = "1")]
            envoy_grpc: Option<EnvoyGrpc>,
        }
        let service = GrpcService::decode(upstream.as_bytes()).unwrap();
        let envoy = service.envoy_grpc.unwrap();
        (envoy.cluster_name, envoy.authority)
    }

    #[test]
    fn plain_names_stay_plain() {
        assert_eq!(
            policy_upstream("arbiter_policy", None).unwrap(),
            "arbiter_policy"
        );
        assert_eq!(
            policy_upstream("outbound_50051__arbiter.svc", None).unwrap(),
            "outbound_50051__arbiter.svc"
        );
    }

    #[test]
    fn istio_names_get_host_and_port_as_authority() {
        let cluster = "outbound|50051||arbiter-policy.arbiter.svc.cluster.local";
        let upstream = policy_upstream(cluster, None).unwrap();
        assert_eq!(
            decode(&upstream),
            (
                cluster.to_owned(),
                "arbiter-policy.arbiter.svc.cluster.local:50051".to_owned()
            )
        );
    }

    #[test]
    fn a_configured_authority_is_always_sent() {
        let upstream = policy_upstream("arbiter_policy", Some("policy.internal")).unwrap();
        assert_eq!(
            decode(&upstream),
            ("arbiter_policy".to_owned(), "policy.internal".to_owned())
        );
    }

    #[test]
    fn unusable_names_are_refused_with_what_to_set() {
        let e = policy_upstream("a|b", None).unwrap_err();
        assert!(e.contains("set `policy_authority`"), "{e}");
        let e = policy_upstream("outbound|http|x|host", None).unwrap_err();
        assert!(e.contains("policy_authority"), "{e}");
        let e = policy_upstream("c", Some("bad authority")).unwrap_err();
        assert!(e.contains("not a valid :authority"), "{e}");
        let long = format!("outbound|50051||{}.svc.cluster.local", "x".repeat(60));
        let e = policy_upstream(&long, None).unwrap_err();
        assert!(e.contains("at most 123 fit"), "{e}");
        assert!(policy_upstream(&long, Some("arbiter")).is_ok());
    }

    proptest! {
        /// Whatever an operator configures: a refusal, a plain valid authority, or a
        /// `GrpcService` that decodes to exactly the cluster and authority.
        #[test]
        fn prop_policy_upstream_is_plain_or_decodes_exactly(
            cluster in "[a-z0-9|._:-]{1,140}",
            authority in proptest::option::of("[a-z0-9.:| -]{0,140}"),
        ) {
            match policy_upstream(&cluster, authority.as_deref()) {
                Err(_) => {}
                Ok(up) if authority.is_none() && up == cluster => {
                    prop_assert!(is_valid_authority(&cluster));
                }
                Ok(up) => {
                    let (c, a) = decode(&up);
                    prop_assert_eq!(c, cluster.clone());
                    prop_assert!(is_valid_authority(&a));
                    if let Some(want) = &authority {
                        prop_assert_eq!(&a, want);
                    }
                }
            }
        }
    }
}
