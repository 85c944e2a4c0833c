//! Policy bundles and the engine that decides with the current one.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};

use cedar_policy::{
    Authorizer, Context, Entities, EntityId, EntityTypeName, EntityUid, Policy, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, SchemaFragment, ValidationMode, Validator,
};
use miette::Diagnostic;
use sha2::{Digest, Sha256};

use crate::request::AuthzRequest;

/// Cedar namespace of every entity type Arbiter sends.
pub const NAMESPACE: &str = "Arbiter";
/// Optional entities file in a bundle.
pub const ENTITIES_FILE: &str = "entities.json";
const POLICY_EXT: &str = "cedar";
const SCHEMA_EXT: &str = "cedarschema";
/// Annotation naming a policy (`@id("routine-chat")`).
const ID_ANNOTATION: &str = "id";

/// Why a bundle cannot be loaded or a request cannot be evaluated.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The bundle directory cannot be listed.
    #[error("cannot read bundle directory `{dir}`")]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A bundle file cannot be read.
    #[error("cannot read `{path}`")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The bundle holds no policy file.
    #[error("no `*.cedar` policy file in `{0}`")]
    NoPolicies(PathBuf),
    /// Policy text does not parse.
    #[error("cannot parse policies: {}", list(.0))]
    Parse(Vec<Problem>),
    /// A policy file holds a template, which a bundle cannot link.
    #[error("`{file}`: templates are not supported (policy `{id}`)")]
    Template {
        /// The file.
        file: String,
        /// The template id.
        id: String,
    },
    /// Two policies share an id.
    #[error("`{file}`: policy id `{id}` is already used in `{first}`")]
    DuplicateId {
        /// The id.
        id: String,
        /// The file of the second use.
        file: String,
        /// The file of the first use.
        first: String,
    },
    /// A schema file does not parse, or the schema files do not fit together.
    #[error("invalid schema: {}", list(.0))]
    Schema(Vec<Problem>),
    /// Policies do not validate against the schema.
    #[error("policies do not match the schema: {}", list(.0))]
    Validation(Vec<Problem>),
    /// `entities.json` is not valid Cedar entities JSON (or does not match the schema).
    #[error("invalid `{ENTITIES_FILE}`: {0}")]
    Entities(String),
    /// A request could not be turned into a Cedar request.
    #[error("cannot build cedar request: {0}")]
    Request(String),
}

/// One problem in a bundle file, with its position when Cedar reports one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `file`, `file:line:column`, or empty when no file is to blame.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "`{}`: {}", self.location, self.message)
        }
    }
}

impl Problem {
    /// A problem located by the first label of a Cedar diagnostic in `text`.
    fn new(file: &str, text: &str, diagnostic: &dyn Diagnostic) -> Self {
        let offset = diagnostic
            .labels()
            .and_then(|mut labels| labels.next())
            .map(|label| label.offset());
        let location = match offset.and_then(|offset| text.get(..offset)) {
            Some(before) => {
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!("{file}:{line}:{column}")
            }
            None => file.to_owned(),
        };
        Self {
            location,
            message: diagnostic.to_string(),
        }
    }
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// Determining policies, sorted: the permits that allowed, or the forbids that denied.
    /// Empty on a default deny (no policy permits the request).
    pub policy_ids: Vec<String>,
    /// Policies skipped because evaluating them failed (Cedar ignores erroring policies).
    pub errors: Vec<String>,
    /// Version of the bundle that decided.
    pub policy_version: String,
}

/// The Cedar entity types of the request model, parsed once per bundle.
#[derive(Debug)]
struct EntityTypes {
    caller: EntityTypeName,
    action: EntityTypeName,
    route: EntityTypeName,
}

impl EntityTypes {
    fn new() -> Result<Self, EngineError> {
        let parse = |name: &str| {
            EntityTypeName::from_str(&format!("{NAMESPACE}::{name}"))
                .map_err(|e| EngineError::Request(e.to_string()))
        };
        Ok(Self {
            caller: parse("Caller")?,
            action: parse("Action")?,
            route: parse("Route")?,
        })
    }
}

/// A loaded, validated policy bundle. Immutable: a reload builds a new one.
#[derive(Debug)]
pub struct Bundle {
    policies: PolicySet,
    entities: Entities,
    version: String,
    types: EntityTypes,
}

/// A bundle file, read.
struct File {
    name: String,
    text: String,
}

impl Bundle {
    /// Loads the bundle in `dir`: every `*.cedar` file, optional `entities.json` and optional
    /// `*.cedarschema` files (policies are then validated strictly against the schema).
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let files = read_bundle_files(dir)?;
        let version = version_of(files.iter().map(|f| (f.name.as_str(), f.text.as_bytes())));
        let with_ext = |ext: &'static str| {
            files
                .iter()
                .filter(move |f| Path::new(&f.name).extension().is_some_and(|e| e == ext))
        };
        if with_ext(POLICY_EXT).next().is_none() {
            return Err(EngineError::NoPolicies(dir.to_owned()));
        }

        let (policies, origins) = parse_policies(with_ext(POLICY_EXT))?;
        let schema = parse_schema(with_ext(SCHEMA_EXT))?;
        if let Some(schema) = &schema {
            validate(&policies, schema, &origins)?;
        }
        let entities = match files.iter().find(|f| f.name == ENTITIES_FILE) {
            Some(file) => Entities::from_json_str(&file.text, schema.as_ref())
                .map_err(|e| EngineError::Entities(e.to_string()))?,
            // The schema's action entities make `action in Action::"group"` work.
            None => match &schema {
                Some(schema) => schema
                    .action_entities()
                    .map_err(|e| EngineError::Entities(e.to_string()))?,
                None => Entities::empty(),
            },
        };

        Ok(Self {
            policies,
            entities,
            version,
            types: EntityTypes::new()?,
        })
    }

    /// Content version: `sha256:` and the first 16 hex digits of the hash over the bundle
    /// files (name and content, in name order).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Number of policies in the bundle.
    pub fn policy_count(&self) -> usize {
        self.policies.policies().count()
    }

    fn cedar_request(&self, req: &AuthzRequest) -> Result<Request, EngineError> {
        let uid = |ty: &EntityTypeName, id: &str| {
            EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
        };
        let string = |s: &str| RestrictedExpression::new_string(s.to_owned());
        let route_context = RestrictedExpression::new_record(
            req.route_context
                .iter()
                .map(|(k, v)| (k.clone(), string(v))),
        )
        .map_err(|e| EngineError::Request(e.to_string()))?;
        let context = Context::from_pairs([
            ("route".to_owned(), string(&req.route)),
            ("method".to_owned(), string(&req.method)),
            ("path".to_owned(), string(&req.path)),
            ("host".to_owned(), string(&req.host)),
            ("scheme".to_owned(), string(&req.scheme)),
            ("source".to_owned(), string(&req.source)),
            ("request_id".to_owned(), string(&req.request_id)),
            ("route_context".to_owned(), route_context),
        ])
        .map_err(|e| EngineError::Request(e.to_string()))?;
        // No schema check of the request: callers and routes unknown to the bundle must still
        // be decided (by policy, which was validated at load), not rejected as malformed.
        Request::new(
            uid(&self.types.caller, &req.principal),
            uid(&self.types.action, &req.action),
            uid(&self.types.route, &req.route),
            context,
            None,
        )
        .map_err(|e| EngineError::Request(e.to_string()))
    }
}

/// Decides requests with the current bundle; a reload swaps the bundle atomically.
#[derive(Debug)]
pub struct PolicyEngine {
    bundle: RwLock<Arc<Bundle>>,
    authorizer: Authorizer,
}

impl PolicyEngine {
    /// An engine deciding with `bundle`.
    pub fn new(bundle: Bundle) -> Self {
        Self {
            bundle: RwLock::new(Arc::new(bundle)),
            authorizer: Authorizer::new(),
        }
    }

    /// Loads the bundle in `dir`.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        Bundle::load(dir).map(Self::new)
    }

    /// The bundle in use. Requests in flight keep the one they started with.
    pub fn bundle(&self) -> Arc<Bundle> {
        // The lock only guards an `Arc` swap, which cannot panic half-way.
        Arc::clone(&self.bundle.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts `bundle` in use for every later decision and returns the previous one.
    pub fn replace(&self, bundle: Arc<Bundle>) -> Arc<Bundle> {
        let mut current = self.bundle.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut current, bundle)
    }

    /// Decides `req` with the current bundle.
    pub fn decide(&self, req: &AuthzRequest) -> Result<Decision, EngineError> {
        let bundle = self.bundle();
        let request = bundle.cedar_request(req)?;
        let response = self
            .authorizer
            .is_authorized(&request, &bundle.policies, &bundle.entities);
        let diagnostics = response.diagnostics();
        let mut policy_ids: Vec<String> = diagnostics.reason().map(ToString::to_string).collect();
        policy_ids.sort();
        Ok(Decision {
            allowed: response.decision() == cedar_policy::Decision::Allow,
            policy_ids,
            errors: diagnostics.errors().map(ToString::to_string).collect(),
            policy_version: bundle.version.clone(),
        })
    }
}

fn read_bundle_files(dir: &Path) -> Result<Vec<File>, EngineError> {
    let read_dir_error = |source| EngineError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
        let path = entry.map_err(read_dir_error)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let is_bundle_file = name == ENTITIES_FILE
            || path
                .extension()
                .is_some_and(|e| e == POLICY_EXT || e == SCHEMA_EXT);
        // `metadata` follows symlinks, as in Kubernetes ConfigMap mounts.
        if name.starts_with('.') || !is_bundle_file || !path.metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::ReadFile {
            path: path.clone(),
            source,
        })?;
        files.push(File {
            name: name.to_owned(),
            text,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// `sha256:` + 16 hex digits over `(name, content)` pairs, framed so that no two different
/// bundles hash the same input. Callers pass the files in name order.
fn version_of<'a>(files: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut hasher = Sha256::new();
    for (name, content) in files {
        hasher.update((name.len() as u64).to_be_bytes());
        hasher.update(name.as_bytes());
        hasher.update((content.len() as u64).to_be_bytes());
        hasher.update(content);
    }
    let digest = hex::encode(hasher.finalize());
    format!("sha256:{}", &digest[..16])
}

/// Parses every policy file into one set. Ids come from `@id("...")`, else are Cedar's
/// generated `policyN` numbered across the files in name order (as if they were concatenated).
/// Returns, per policy id, the file and text it came from, to locate validation errors.
fn parse_policies<'a>(
    files: impl Iterator<Item = &'a File>,
) -> Result<(PolicySet, HashMap<PolicyId, &'a File>), EngineError> {
    let mut set = PolicySet::new();
    let mut origins: HashMap<PolicyId, &File> = HashMap::new();
    let mut problems = Vec::new();
    let mut numbered = 0;
    for file in files {
        let parsed = match PolicySet::from_str(&file.text) {
            Ok(parsed) => parsed,
            Err(errors) => {
                problems.extend(
                    errors
                        .iter()
                        .map(|e| Problem::new(&file.name, &file.text, e)),
                );
                continue;
            }
        };
        if let Some(template) = parsed.templates().next() {
            return Err(EngineError::Template {
                file: file.name.clone(),
                id: template.id().to_string(),
            });
        }
        let mut policies: Vec<&Policy> = parsed.policies().collect();
        // Cedar numbers `policyN` in file order; keep that order across files.
        policies.sort_by_key(|p| generated_index(p.id()));
        for policy in policies {
            let id = match policy.annotation(ID_ANNOTATION) {
                Some(id) => PolicyId::new(id),
                None => PolicyId::new(format!("policy{numbered}")),
            };
            numbered += 1;
            if let Some(first) = origins.get(&id) {
                return Err(EngineError::DuplicateId {
                    id: id.to_string(),
                    file: file.name.clone(),
                    first: first.name.clone(),
                });
            }
            set.add(policy.new_id(id.clone()))
                .map_err(|e| EngineError::Parse(vec![Problem::new(&file.name, &file.text, &e)]))?;
            origins.insert(id, file);
        }
    }
    if problems.is_empty() {
        Ok((set, origins))
    } else {
        Err(EngineError::Parse(problems))
    }
}

fn generated_index(id: &PolicyId) -> usize {
    id.to_string()
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

fn parse_schema<'a>(files: impl Iterator<Item = &'a File>) -> Result<Option<Schema>, EngineError> {
    let mut fragments = Vec::new();
    let mut problems = Vec::new();
    for file in files {
        match SchemaFragment::from_cedarschema_str(&file.text) {
            Ok((fragment, warnings)) => {
                for warning in warnings {
                    tracing::warn!(file = %file.name, "schema warning: {warning}");
                }
                fragments.push(fragment);
            }
            Err(e) => problems.push(Problem::new(&file.name, &file.text, &e)),
        }
    }
    if !problems.is_empty() {
        return Err(EngineError::Schema(problems));
    }
    if fragments.is_empty() {
        return Ok(None);
    }
    Schema::from_schema_fragments(fragments)
        .map(Some)
        .map_err(|e| {
            EngineError::Schema(vec![Problem {
                location: String::new(),
                message: e.to_string(),
            }])
        })
}

fn validate(
    policies: &PolicySet,
    schema: &Schema,
    origins: &HashMap<PolicyId, &File>,
) -> Result<(), EngineError> {
    let locate = |id: &PolicyId, diagnostic: &dyn Diagnostic| match origins.get(id) {
        Some(file) => Problem::new(&file.name, &file.text, diagnostic),
        None => Problem {
            location: String::new(),
            message: diagnostic.to_string(),
        },
    };
    let result = Validator::new(schema.clone()).validate(policies, ValidationMode::Strict);
    for warning in result.validation_warnings() {
        let problem = locate(warning.policy_id(), warning);
        tracing::warn!("policy warning: {problem}");
    }
    let problems: Vec<Problem> = result
        .validation_errors()
        .map(|e| locate(e.policy_id(), e))
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(EngineError::Validation(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn bundle(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn request(principal: &str, action: &str) -> AuthzRequest {
        AuthzRequest {
            principal: principal.into(),
            action: action.into(),
            route: "chat".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            host: "llm.local".into(),
            scheme: "http".into(),
            source: "127.0.0.1:5000".into(),
            request_id: "r1".into(),
            route_context: BTreeMap::new(),
        }
    }

    const PERMIT_CHAT: &str =
        "@id(\"chat\")\npermit(principal, action == Arbiter::Action::\"chat.completions\", resource);\n";

    #[test]
    fn version_is_stable_and_content_addressed() {
        let a = bundle(&[("a.cedar", PERMIT_CHAT), ("README.md", "ignored")]);
        let b = bundle(&[("a.cedar", PERMIT_CHAT)]);
        let v1 = Bundle::load(a.path()).unwrap().version().to_owned();
        let v2 = Bundle::load(a.path()).unwrap().version().to_owned();
        assert_eq!(v1, v2);
        assert_eq!(v1, Bundle::load(b.path()).unwrap().version());
        assert!(v1.starts_with("sha256:"));
        assert_eq!(v1.len(), "sha256:".len() + 16);

        let renamed = bundle(&[("b.cedar", PERMIT_CHAT)]);
        assert_ne!(v1, Bundle::load(renamed.path()).unwrap().version());
        let changed = bundle(&[("a.cedar", &format!("{PERMIT_CHAT}\n"))]);
        assert_ne!(v1, Bundle::load(changed.path()).unwrap().version());
        let with_entities = bundle(&[("a.cedar", PERMIT_CHAT), ("entities.json", "[]")]);
        assert_ne!(v1, Bundle::load(with_entities.path()).unwrap().version());
        // Fixed input, fixed output: the framing must not change silently.
        assert_eq!(
            version_of([("a.cedar", PERMIT_CHAT.as_bytes())]),
            version_of([("a.cedar", PERMIT_CHAT.as_bytes())])
        );
        assert_ne!(
            version_of([("ab", b"c".as_slice())]),
            version_of([("a", b"bc".as_slice())])
        );
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let dir = bundle(&[
            ("good.cedar", PERMIT_CHAT),
            (
                "bad.cedar",
                "permit(principal, action, resource);\n\nforbid(principal, action)\n",
            ),
        ]);
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.starts_with("cannot parse policies: `bad.cedar:3:"),
            "{err}"
        );
    }

    #[test]
    fn load_errors() {
        let empty = bundle(&[("entities.json", "[]")]);
        assert!(matches!(
            Bundle::load(empty.path()),
            Err(EngineError::NoPolicies(_))
        ));
        let missing = empty.path().join("nope");
        assert!(matches!(
            Bundle::load(&missing),
            Err(EngineError::ReadDir { .. })
        ));
        let bad_entities = bundle(&[("a.cedar", PERMIT_CHAT), ("entities.json", "{")]);
        let err = Bundle::load(bad_entities.path()).unwrap_err().to_string();
        assert!(err.starts_with("invalid `entities.json`: "), "{err}");
        let duplicate = bundle(&[("a.cedar", PERMIT_CHAT), ("b.cedar", PERMIT_CHAT)]);
        assert_eq!(
            Bundle::load(duplicate.path()).unwrap_err().to_string(),
            "`b.cedar`: policy id `chat` is already used in `a.cedar`"
        );
        let template = bundle(&[(
            "t.cedar",
            "permit(principal == ?principal, action, resource);",
        )]);
        assert!(matches!(
            Bundle::load(template.path()),
            Err(EngineError::Template { .. })
        ));
    }

    #[test]
    fn ids_from_annotation_else_generated_across_files() {
        let dir = bundle(&[
            ("a.cedar", "permit(principal, action, resource) when { context.path == \"/x\" };\n@id(\"named\") permit(principal, action, resource) when { context.path == \"/y\" };\npermit(principal, action, resource) when { context.path == \"/z\" };"),
            ("b.cedar", "permit(principal, action, resource) when { context.path == \"/w\" };"),
        ]);
        let engine = PolicyEngine::load(dir.path()).unwrap();
        let decide = |path: &str| {
            let mut req = request("anonymous", "http.request");
            req.path = path.into();
            engine.decide(&req).unwrap().policy_ids
        };
        assert_eq!(decide("/x"), ["policy0"]);
        assert_eq!(decide("/y"), ["named"]);
        assert_eq!(decide("/z"), ["policy2"]);
        assert_eq!(decide("/w"), ["policy3"]);
    }

    #[test]
    fn decides_and_reports_determining_policies() {
        let dir = bundle(&[(
            "p.cedar",
            &format!("{PERMIT_CHAT}@id(\"no-bots\") forbid(principal == Arbiter::Caller::\"bot\", action, resource);\n@id(\"broken\") forbid(principal, action, resource) when {{ context.route_context.missing == \"x\" }};"),
        )]);
        let engine = PolicyEngine::load(dir.path()).unwrap();

        let allow = engine
            .decide(&request("alice", "chat.completions"))
            .unwrap();
        assert!(allow.allowed);
        assert_eq!(allow.policy_ids, ["chat"]);
        // The erroring forbid is skipped, not fatal.
        assert_eq!(allow.errors.len(), 1);
        assert!(allow.errors[0].contains("broken"), "{:?}", allow.errors);

        let deny = engine.decide(&request("bot", "chat.completions")).unwrap();
        assert!(!deny.allowed);
        assert_eq!(deny.policy_ids, ["no-bots"]);

        let default = engine.decide(&request("alice", "http.request")).unwrap();
        assert!(!default.allowed);
        assert!(default.policy_ids.is_empty());
        assert_eq!(default.policy_version, engine.bundle().version());
    }

    const SCHEMA: &str = r#"namespace Arbiter {
  entity Caller;
  entity Route;
  action "chat.completions" appliesTo {
    principal: [Caller],
    resource: [Route],
    context: { route: String, route_context: { classification?: String } },
  };
}"#;

    #[test]
    fn schema_validates_policies_and_unknown_callers_still_evaluate() {
        let dir = bundle(&[
            ("a.cedar", PERMIT_CHAT),
            ("arbiter.cedarschema", SCHEMA),
            (
                "entities.json",
                r#"[{"uid": {"type": "Arbiter::Caller", "id": "known"}, "attrs": {}, "parents": []}]"#,
            ),
        ]);
        let engine = PolicyEngine::load(dir.path()).unwrap();
        assert!(
            engine
                .decide(&request("stranger", "chat.completions"))
                .unwrap()
                .allowed
        );
        assert!(
            engine
                .decide(&request("known", "chat.completions"))
                .unwrap()
                .allowed
        );

        let invalid = bundle(&[
            ("a.cedar", PERMIT_CHAT),
            ("b.cedar", "\n@id(\"typo\")\npermit(principal, action, resource) when { context.rout == \"x\" };"),
            ("arbiter.cedarschema", SCHEMA),
        ]);
        let err = Bundle::load(invalid.path()).unwrap_err().to_string();
        assert!(
            err.starts_with("policies do not match the schema: `b.cedar:3:"),
            "{err}"
        );

        let bad_schema = bundle(&[("a.cedar", PERMIT_CHAT), ("s.cedarschema", "namespace {")]);
        let err = Bundle::load(bad_schema.path()).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid schema: `s.cedarschema:1:"),
            "{err}"
        );
    }

    #[test]
    fn replace_swaps_the_bundle() {
        let first = bundle(&[("a.cedar", PERMIT_CHAT)]);
        let second = bundle(&[("a.cedar", "forbid(principal, action, resource);")]);
        let engine = PolicyEngine::load(first.path()).unwrap();
        let old = engine.replace(Arc::new(Bundle::load(second.path()).unwrap()));
        assert_ne!(old.version(), engine.bundle().version());
        assert!(
            !engine
                .decide(&request("a", "chat.completions"))
                .unwrap()
                .allowed
        );
    }
}
