//! Policy bundles: a directory read, validated as a whole against the Arbiter schema, and
//! compiled into an immutable [`Bundle`] (a reload builds a new one).
//!
//! | file | required | meaning |
//! |---|---|---|
//! | `*.cedar` | at least one | policies |
//! | `*.cedarschema` | no | extensions of the built-in schema (see [`crate::schema`]) |
//! | `entities.json` | no | callers (tenant, groups, API-key hashes) and groups |
//! | `bundle.toml` | no | `name` and JWT claim names |
//!
//! Everything else in the directory is ignored. Validation is strict: Cedar's strict mode,
//! and its warnings (an impossible policy, confusable or bidirectional characters) are
//! errors too, because each of them means a policy that silently does not do what it says.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Entities, Entity, EntityUid, Policy, PolicyId, PolicySet, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use sha2::{Digest, Sha256};

use crate::identity::{EntityTypes, JwtConfig};
use crate::index::PolicyIndex;
use crate::schema::{self, error_chain, BundleFragment};

/// Entities file of a bundle.
pub const ENTITIES_FILE: &str = "entities.json";
/// Optional bundle settings file.
pub const CONFIG_FILE: &str = "bundle.toml";
/// Largest bundle accepted: all its files together. Larger is refused before reading, so a
/// runaway generator cannot exhaust the server's memory on reload.
pub const MAX_BUNDLE_BYTES: u64 = 64 * 1024 * 1024;
const POLICY_EXT: &str = "cedar";
const SCHEMA_EXT: &str = "cedarschema";
/// Annotation naming a policy (`@id("routine-chat")`).
const ID_ANNOTATION: &str = "id";

/// Why a bundle cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
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
    /// A bundle file is not UTF-8.
    #[error("`{0}` is not UTF-8 text")]
    NotUtf8(String),
    /// The bundle is larger than [`MAX_BUNDLE_BYTES`].
    #[error(
        "bundle is too large: with `{file}` it has {bytes} bytes, the limit is {MAX_BUNDLE_BYTES}"
    )]
    TooLarge {
        /// The file that crossed the limit.
        file: String,
        /// The size so far.
        bytes: u64,
    },
    /// The bundle holds no policy file.
    #[error("no `*.cedar` policy file in `{0}`")]
    NoPolicies(PathBuf),
    /// `bundle.toml` is invalid.
    #[error("invalid `{CONFIG_FILE}`: {0}")]
    Config(String),
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
    /// A schema file does not parse or does not fit the built-in schema.
    #[error("invalid schema: {}", list(.0))]
    Schema(Vec<Problem>),
    /// Policies do not validate against the schema.
    #[error("policies do not match the schema: {}", list(.0))]
    Validation(Vec<Problem>),
    /// `entities.json` is invalid or does not match the schema.
    #[error("invalid `{ENTITIES_FILE}`: {0}")]
    Entities(String),
    /// The policies cannot be indexed or the request model cannot be built (a bug).
    #[error("cannot build the bundle: {0}")]
    Internal(String),
}

impl BundleError {
    /// Every problem, one per line, for `arbiter validate`.
    pub fn problems(&self) -> Vec<String> {
        match self {
            Self::Parse(problems) | Self::Schema(problems) | Self::Validation(problems) => {
                let what = match self {
                    Self::Parse(_) => "cannot parse policy",
                    Self::Schema(_) => "invalid schema",
                    _ => "policy does not match the schema",
                };
                problems
                    .iter()
                    .map(|p| {
                        if p.location.is_empty() {
                            format!("{what}: {}", p.message)
                        } else {
                            format!("{}: {what}: {}", p.location, p.message)
                        }
                    })
                    .collect()
            }
            other => vec![error_chain(other)],
        }
    }
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
    pub fn new(file: &str, text: &str, diagnostic: &dyn Diagnostic) -> Self {
        let offset = diagnostic
            .labels()
            .and_then(|mut labels| labels.next())
            .map(|label| label.offset());
        let location = match offset {
            Some(offset) => format!("{file}:{}", line_column(text, offset)),
            None => file.to_owned(),
        };
        let mut message = diagnostic.to_string();
        if let Some(help) = diagnostic.help() {
            message.push_str(&format!(" (help: {help})"));
        }
        Self { location, message }
    }
}

/// `line:column` (1-based) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> String {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("{line}:{column}")
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// `bundle.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleConfig {
    /// Declared name, part of the version (`name@sha256:…`). Letters, digits, `.`, `_`,
    /// `-`; at most 64 characters.
    #[serde(default)]
    pub name: Option<String>,
    /// Which JWT claims carry tenant and groups.
    #[serde(default)]
    pub jwt: JwtConfig,
}

impl BundleConfig {
    fn parse(text: &str) -> Result<Self, BundleError> {
        let config: Self = toml::from_str(text)
            .map_err(|e| BundleError::Config(e.to_string().trim().to_owned()))?;
        if let Some(name) = &config.name {
            let valid = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid {
                return Err(BundleError::Config(format!(
                    "`name` must be 1-64 letters, digits, `.`, `_` or `-`, got `{name}`"
                )));
            }
        }
        for (key, claim) in [
            ("tenant_claim", &config.jwt.tenant_claim),
            ("groups_claim", &config.jwt.groups_claim),
        ] {
            if claim.is_empty() {
                return Err(BundleError::Config(format!("`jwt.{key}` is empty")));
            }
        }
        Ok(config)
    }
}

/// Where a policy came from, for messages and `arbiter check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOrigin {
    /// File name in the bundle.
    pub file: String,
    /// Line of its `@id` annotation (1-based), when it has one.
    pub line: Option<usize>,
}

impl fmt::Display for PolicyOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.file),
            None => write!(f, "{}", self.file),
        }
    }
}

/// A loaded, validated policy bundle. Immutable.
#[derive(Debug)]
pub struct Bundle {
    pub(crate) policies: PolicySet,
    pub(crate) index: PolicyIndex,
    /// The bundle's entities, transitively closed (callers, groups).
    pub(crate) entities: Entities,
    /// API-key hash → caller.
    pub(crate) api_keys: HashMap<String, EntityUid>,
    /// Entities named literally in policies (their attributes must be readable), with the
    /// request's action added per request. Shared (`Arc`) with every request's store, and
    /// transitively closed like [`Self::entities`].
    pub(crate) literal_entities: Vec<Arc<cedar_policy_core::ast::Entity>>,
    /// Action entities of the schema, by uid (with their groups as ancestors, closed).
    pub(crate) actions: HashMap<EntityUid, Arc<cedar_policy_core::ast::Entity>>,
    pub(crate) types: EntityTypes,
    pub(crate) config: BundleConfig,
    origins: HashMap<String, PolicyOrigin>,
    schema: Schema,
    version: String,
}

/// A bundle file, read.
struct File {
    name: String,
    text: String,
}

impl Bundle {
    /// Loads, validates and compiles the bundle in `dir`.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let files = read_bundle_files(dir)?;
        let with_ext = |ext: &'static str| {
            files
                .iter()
                .filter(move |f| Path::new(&f.name).extension().is_some_and(|e| e == ext))
        };
        if with_ext(POLICY_EXT).next().is_none() {
            return Err(BundleError::NoPolicies(dir.to_owned()));
        }
        let config = match files.iter().find(|f| f.name == CONFIG_FILE) {
            Some(file) => BundleConfig::parse(&file.text)?,
            None => BundleConfig::default(),
        };
        let hash = content_hash(files.iter().map(|f| (f.name.as_str(), f.text.as_bytes())));
        let version = match &config.name {
            Some(name) => format!("{name}@{hash}"),
            None => hash,
        };

        let (policies, origins, texts) = parse_policies(with_ext(POLICY_EXT))?;
        let schema = parse_schema(with_ext(SCHEMA_EXT))?;
        validate(&policies, &schema, &texts)?;

        let action_entities = schema
            .action_entities()
            .map_err(|e| BundleError::Internal(error_chain(&e)))?;
        let entities = match files.iter().find(|f| f.name == ENTITIES_FILE) {
            Some(file) => Entities::from_json_str(&file.text, Some(&schema))
                .map_err(|e| BundleError::Entities(error_chain(&e)))?,
            None => Entities::empty(),
        };
        let types = EntityTypes::new().map_err(|e| BundleError::Internal(e.to_string()))?;
        let api_keys = api_key_index(&entities, &types)?;

        let actions: HashMap<EntityUid, Arc<cedar_policy_core::ast::Entity>> = action_entities
            .iter()
            .map(|e| (e.uid(), Arc::new(e.as_ref().clone())))
            .collect();
        let index = PolicyIndex::new(&policies, |group| {
            actions
                .keys()
                .filter(|a| *a == group || action_entities.is_ancestor_of(group, a))
                .cloned()
                .collect()
        })
        .map_err(BundleError::Internal)?;

        let mut literals: HashSet<EntityUid> = HashSet::new();
        for policy in policies.policies() {
            literals.extend(policy.entity_literals());
        }
        // Only entities whose store entry changes an answer: with attributes to read, or
        // parents for `in` (a literal without either evaluates the same when absent). This
        // keeps the per-request store small when policies name many groups or routes.
        let literal_entities = literals
            .iter()
            .filter_map(|uid| entities.get(uid))
            .filter(|entity| {
                let uid = entity.uid();
                let has_parents = entities
                    .ancestors(&uid)
                    .is_some_and(|mut a| a.next().is_some());
                let has_attributes = !Entity::clone(entity).into_inner().1.is_empty();
                has_parents || has_attributes
            })
            .map(|entity| Arc::new(entity.as_ref().clone()))
            .collect();

        let origins = origins
            .into_iter()
            .map(|(id, origin)| (id.to_string(), origin))
            .collect();
        Ok(Self {
            policies,
            index,
            entities,
            api_keys,
            literal_entities,
            actions,
            types,
            config,
            origins,
            schema,
            version,
        })
    }

    /// Version: `sha256:` and the first 16 hex digits of the hash over the bundle files
    /// (name and content, in name order), prefixed by `<name>@` when `bundle.toml` names it.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Declared name, if any.
    pub fn name(&self) -> Option<&str> {
        self.config.name.as_deref()
    }

    /// Number of policies in the bundle.
    pub fn policy_count(&self) -> usize {
        self.policies.policies().count()
    }

    /// Number of entities from `entities.json` (the schema's actions not counted).
    pub fn entity_count(&self) -> usize {
        self.entities
            .iter()
            .filter(|e| e.uid().type_name() != &self.types.action)
            .count()
    }

    /// Number of callers with an API key.
    pub fn api_key_count(&self) -> usize {
        self.api_keys.len()
    }

    /// Where policy `id` is defined.
    pub fn origin(&self, id: &str) -> Option<&PolicyOrigin> {
        self.origins.get(id)
    }

    /// The schema the bundle was validated against (built-in plus its extensions).
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Number of scope buckets the policies were partitioned into.
    pub fn index_buckets(&self) -> usize {
        self.index.buckets()
    }

    /// Every policy id, sorted (`arbiter test` coverage).
    pub fn policy_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .policies
            .policies()
            .map(|p| p.id().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// Route names the bundle knows: `Arbiter::Route` entities in `entities.json` and
    /// routes named literally in policies (per-route metric labels).
    pub fn route_names(&self) -> std::collections::BTreeSet<String> {
        let route = &self.types.route;
        let from_entities = self.entities.iter().map(Entity::uid);
        let from_policies = self.policies.policies().flat_map(|p| p.entity_literals());
        from_entities
            .chain(from_policies)
            .filter(|uid| uid.type_name() == route)
            .map(|uid| uid.id().unescaped().to_owned())
            .collect()
    }

    /// Which JWT claims carry tenant and groups (`bundle.toml` `[jwt]`).
    pub fn jwt_config(&self) -> &crate::identity::JwtConfig {
        &self.config.jwt
    }
}

fn read_bundle_files(dir: &Path) -> Result<Vec<File>, BundleError> {
    let read_dir_error = |source| BundleError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
        let path = entry.map_err(read_dir_error)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') || !is_bundle_file(&path) {
            continue;
        }
        // `metadata` follows symlinks, as in Kubernetes ConfigMap mounts.
        match path.metadata() {
            Ok(meta) if meta.is_file() => paths.push((name.to_owned(), path, meta.len())),
            Ok(_) => {}
            // Deleted between listing and now (an editor's temporary file): not part of it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(BundleError::ReadFile { path, source }),
        }
    }
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    let mut total: u64 = 0;
    let mut files = Vec::new();
    for (name, path, len) in paths {
        total = total.saturating_add(len);
        if total > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge {
                file: name,
                bytes: total,
            });
        }
        let mut bytes = Vec::new();
        let file = std::fs::File::open(&path).map_err(|source| BundleError::ReadFile {
            path: path.clone(),
            source,
        })?;
        // The file may grow after `metadata`; never read past the limit.
        let room = MAX_BUNDLE_BYTES - (total - len);
        file.take(room + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| BundleError::ReadFile {
                path: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > room {
            return Err(BundleError::TooLarge {
                file: name,
                bytes: total - len + bytes.len() as u64,
            });
        }
        total = total - len + bytes.len() as u64;
        let text = String::from_utf8(bytes).map_err(|_| BundleError::NotUtf8(name.clone()))?;
        files.push(File { name, text });
    }
    Ok(files)
}

/// Whether `path` names a file that is part of a bundle.
pub fn is_bundle_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.starts_with('.')
        && (name == ENTITIES_FILE
            || name == CONFIG_FILE
            || path
                .extension()
                .is_some_and(|e| e == POLICY_EXT || e == SCHEMA_EXT))
}

/// `sha256:` + 16 hex digits over `(name, content)` pairs, framed so that no two different
/// bundles hash the same input. Callers pass the files in name order.
fn content_hash<'a>(files: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
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
/// generated `policyN` numbered across the files in name order (as if concatenated).
#[allow(clippy::type_complexity)]
fn parse_policies<'a>(
    files: impl Iterator<Item = &'a File>,
) -> Result<
    (
        PolicySet,
        HashMap<PolicyId, PolicyOrigin>,
        HashMap<PolicyId, &'a File>,
    ),
    BundleError,
> {
    let mut set = PolicySet::new();
    let mut origins: HashMap<PolicyId, PolicyOrigin> = HashMap::new();
    let mut texts: HashMap<PolicyId, &File> = HashMap::new();
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
            return Err(BundleError::Template {
                file: file.name.clone(),
                id: template.id().to_string(),
            });
        }
        let mut policies: Vec<&Policy> = parsed.policies().collect();
        // Cedar numbers `policyN` in file order; keep that order across files.
        policies.sort_by_key(|p| generated_index(p.id()));
        for policy in policies {
            let (id, line) = match policy.annotation(ID_ANNOTATION) {
                Some(id) => (PolicyId::new(id), annotation_line(&file.text, id)),
                None => (PolicyId::new(format!("policy{numbered}")), None),
            };
            numbered += 1;
            if let Some(first) = origins.get(&id) {
                return Err(BundleError::DuplicateId {
                    id: id.to_string(),
                    file: file.name.clone(),
                    first: first.file.clone(),
                });
            }
            set.add(policy.new_id(id.clone()))
                .map_err(|e| BundleError::Parse(vec![Problem::new(&file.name, &file.text, &e)]))?;
            origins.insert(
                id.clone(),
                PolicyOrigin {
                    file: file.name.clone(),
                    line,
                },
            );
            texts.insert(id, file);
        }
    }
    if problems.is_empty() {
        Ok((set, origins, texts))
    } else {
        Err(BundleError::Parse(problems))
    }
}

/// Line of `@id("<id>")` in `text`.
fn annotation_line(text: &str, id: &str) -> Option<usize> {
    let needle = format!("\"{id}\"");
    text.lines()
        .position(|line| line.contains("@id") && line.contains(&needle))
        .map(|i| i + 1)
}

fn generated_index(id: &PolicyId) -> usize {
    id.to_string()
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

fn parse_schema<'a>(files: impl Iterator<Item = &'a File>) -> Result<Schema, BundleError> {
    let mut fragments = Vec::new();
    let mut problems = Vec::new();
    for file in files {
        match schema::parse_fragment(&file.name, &file.text) {
            Ok(fragment) => fragments.push(BundleFragment {
                file: &file.name,
                text: &file.text,
                fragment,
            }),
            Err(problem) => problems.push(problem),
        }
    }
    if !problems.is_empty() {
        return Err(BundleError::Schema(problems));
    }
    schema::build(fragments)
}

/// Strict validation; Cedar's warnings count as errors (see the module docs). Cedar reports
/// one error per action a policy may apply to; one per place is enough. Diagnostic offsets
/// are into the text of the file the policy was parsed from.
fn validate(
    policies: &PolicySet,
    schema: &Schema,
    files: &HashMap<PolicyId, &File>,
) -> Result<(), BundleError> {
    let result = Validator::new(schema.clone()).validate(policies, ValidationMode::Strict);
    let mut problems: Vec<Problem> = Vec::new();
    let mut seen = HashSet::new();
    let errors = result
        .validation_errors()
        .map(|e| (e.policy_id(), e as &dyn Diagnostic));
    let warnings = result
        .validation_warnings()
        .map(|w| (w.policy_id(), w as &dyn Diagnostic));
    for (id, diagnostic) in errors.chain(warnings) {
        let problem = match files.get(id) {
            Some(file) => Problem::new(&file.name, &file.text, diagnostic),
            None => Problem {
                location: String::new(),
                message: diagnostic.to_string(),
            },
        };
        if seen.insert((problem.location.clone(), id.clone())) {
            problems.push(problem);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(BundleError::Validation(problems))
    }
}

/// API-key hash → caller, checking each hash is 64 lowercase hex digits and names one caller.
fn api_key_index(
    entities: &Entities,
    types: &EntityTypes,
) -> Result<HashMap<String, EntityUid>, BundleError> {
    let mut index: HashMap<String, EntityUid> = HashMap::new();
    for entity in entities.iter() {
        let uid = entity.uid();
        if uid.type_name() != &types.caller {
            continue;
        }
        let Some(Ok(value)) = entity.attr("api_key_sha256") else {
            continue;
        };
        let cedar_policy::EvalResult::Set(hashes) = value else {
            continue;
        };
        for hash in hashes.iter() {
            let cedar_policy::EvalResult::String(hash) = hash else {
                continue;
            };
            let valid = hash.len() == 64
                && hash
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
            if !valid {
                return Err(BundleError::Entities(format!(
                    "caller `{}`: api_key_sha256 `{hash}` is not 64 lowercase hex digits (SHA-256 of the key)",
                    uid.id().unescaped()
                )));
            }
            if let Some(other) = index.insert(hash.clone(), uid.clone()) {
                if other != uid {
                    let mut callers = [other.id().unescaped(), uid.id().unescaped()];
                    callers.sort_unstable();
                    return Err(BundleError::Entities(format!(
                        "api_key_sha256 `{hash}` is listed by callers `{}` and `{}`",
                        callers[0], callers[1]
                    )));
                }
            }
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn bundle(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    const PERMIT_CHAT: &str =
        "@id(\"chat\")\npermit(principal, action == Arbiter::Action::\"chat.completions\", resource);\n";

    #[test]
    fn version_is_stable_and_content_addressed() {
        let a = bundle(&[("a.cedar", PERMIT_CHAT), ("README.md", "ignored")]);
        let b = bundle(&[("a.cedar", PERMIT_CHAT)]);
        let v1 = Bundle::load(a.path()).unwrap().version().to_owned();
        assert_eq!(v1, Bundle::load(a.path()).unwrap().version());
        assert_eq!(v1, Bundle::load(b.path()).unwrap().version());
        assert!(v1.starts_with("sha256:"));
        assert_eq!(v1.len(), "sha256:".len() + 16);
        let renamed = bundle(&[("b.cedar", PERMIT_CHAT)]);
        assert_ne!(v1, Bundle::load(renamed.path()).unwrap().version());
        let changed = bundle(&[("a.cedar", &format!("{PERMIT_CHAT}\n"))]);
        assert_ne!(v1, Bundle::load(changed.path()).unwrap().version());
        let with_entities = bundle(&[("a.cedar", PERMIT_CHAT), ("entities.json", "[]")]);
        assert_ne!(v1, Bundle::load(with_entities.path()).unwrap().version());
        assert_ne!(
            content_hash([("ab", b"c".as_slice())]),
            content_hash([("a", b"bc".as_slice())])
        );
    }

    #[test]
    fn bundle_toml_names_the_version_and_is_strict() {
        let named = bundle(&[
            ("a.cedar", PERMIT_CHAT),
            ("bundle.toml", "name = \"team-a\"\n"),
        ]);
        let loaded = Bundle::load(named.path()).unwrap();
        assert!(
            loaded.version().starts_with("team-a@sha256:"),
            "{}",
            loaded.version()
        );
        assert_eq!(loaded.name(), Some("team-a"));
        for (text, expected) in [
            ("nmae = \"x\"", "unknown field `nmae`"),
            ("name = \"a b\"", "`name` must be 1-64 letters"),
            ("name = 5", "invalid type"),
            ("[jwt]\ntenant_claim = \"\"", "`jwt.tenant_claim` is empty"),
            ("[jwt]\ngroup_claim = \"g\"", "unknown field `group_claim`"),
        ] {
            let dir = bundle(&[("a.cedar", PERMIT_CHAT), ("bundle.toml", text)]);
            let err = Bundle::load(dir.path()).unwrap_err().to_string();
            assert!(err.starts_with("invalid `bundle.toml`: "), "{err}");
            assert!(err.contains(expected), "{text}: {err}");
        }
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
        let err = Bundle::load(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot parse policies: `bad.cedar:3:"),
            "{err}"
        );
        assert!(
            err.problems()[0].starts_with("bad.cedar:3:"),
            "{:?}",
            err.problems()
        );
    }

    #[test]
    fn load_errors() {
        let empty = bundle(&[("entities.json", "[]")]);
        assert!(matches!(
            Bundle::load(empty.path()),
            Err(BundleError::NoPolicies(_))
        ));
        let nothing = bundle(&[]);
        assert!(matches!(
            Bundle::load(nothing.path()),
            Err(BundleError::NoPolicies(_))
        ));
        let missing = empty.path().join("nope");
        assert!(matches!(
            Bundle::load(&missing),
            Err(BundleError::ReadDir { .. })
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
            Err(BundleError::Template { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.cedar"),
            b"permit(principal, action, resource) when { context.path == \"\xff\" };",
        )
        .unwrap();
        assert_eq!(
            Bundle::load(dir.path()).unwrap_err().to_string(),
            "`a.cedar` is not UTF-8 text"
        );
    }

    #[test]
    fn unknown_attributes_and_impossible_policies_are_errors() {
        let dir = bundle(&[
            ("a.cedar", PERMIT_CHAT),
            (
                "b.cedar",
                "\n@id(\"typo\")\npermit(principal, action, resource) when { context.rout == \"x\" };",
            ),
        ]);
        let err = Bundle::load(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("policies do not match the schema: `b.cedar:3:"),
            "{err}"
        );
        // One problem per place, not one per action the policy applies to.
        assert_eq!(err.problems().len(), 1, "{:?}", err.problems());

        // Undeclared route context keys: `has` makes the policy impossible, not an error,
        // in Cedar; a forbid that can never apply is refused here.
        let dir = bundle(&[(
            "a.cedar",
            "forbid(principal, action, resource) when { context.route_context has tier && context.route_context.tier == \"x\" };",
        )]);
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("impossible"), "{err}");

        let dir = bundle(&[(
            "a.cedar",
            "permit(principal, action, resource) when { principal.tenant == \"a\" };",
        )]);
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tenant"), "{err}");

        let dir = bundle(&[("a.cedar", PERMIT_CHAT), ("s.cedarschema", "namespace {")]);
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid schema: `s.cedarschema:1:"),
            "{err}"
        );
    }

    #[test]
    fn entities_are_checked_against_the_schema() {
        for (entities, expected) in [
            (
                r#"[{"uid":{"type":"Arbiter::Caller","id":"a"},"attrs":{"tenat":"x"},"parents":[]}]"#,
                "tenat",
            ),
            (
                r#"[{"uid":{"type":"Arbiter::Team","id":"a"},"attrs":{},"parents":[]}]"#,
                "Arbiter::Team",
            ),
            (
                r#"[{"uid":{"type":"Arbiter::Caller","id":"a"},"attrs":{"api_key_sha256":["ABC"]},"parents":[]}]"#,
                "is not 64 lowercase hex digits",
            ),
            (
                &format!(
                    r#"[{{"uid":{{"type":"Arbiter::Caller","id":"a"}},"attrs":{{"api_key_sha256":["{0}"]}},"parents":[]}},
                        {{"uid":{{"type":"Arbiter::Caller","id":"b"}},"attrs":{{"api_key_sha256":["{0}"]}},"parents":[]}}]"#,
                    "a".repeat(64)
                ),
                "is listed by callers `a` and `b`",
            ),
        ] {
            let dir = bundle(&[("a.cedar", PERMIT_CHAT), ("entities.json", entities)]);
            let err = Bundle::load(dir.path()).unwrap_err().to_string();
            assert!(err.starts_with("invalid `entities.json`"), "{err}");
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn oversized_bundles_are_refused_before_reading() {
        let dir = bundle(&[("a.cedar", PERMIT_CHAT)]);
        // Sparse: no disk is written, only the length is set.
        let file = std::fs::File::create(dir.path().join("entities.json")).unwrap();
        file.set_len(MAX_BUNDLE_BYTES + 1).unwrap();
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.starts_with("bundle is too large: with `entities.json` it has"),
            "{err}"
        );
        assert!(
            err.ends_with(&format!("the limit is {MAX_BUNDLE_BYTES}")),
            "{err}"
        );
    }

    #[test]
    fn ids_from_annotation_else_generated_across_files() {
        let dir = bundle(&[
            ("a.cedar", "permit(principal, action, resource) when { context.path == \"/x\" };\n@id(\"named\") permit(principal, action, resource) when { context.path == \"/y\" };\npermit(principal, action, resource) when { context.path == \"/z\" };"),
            ("b.cedar", "permit(principal, action, resource) when { context.path == \"/w\" };"),
        ]);
        let loaded = Bundle::load(dir.path()).unwrap();
        assert_eq!(loaded.policy_count(), 4);
        assert_eq!(loaded.origin("named").unwrap().to_string(), "a.cedar:2");
        assert_eq!(loaded.origin("policy3").unwrap().to_string(), "b.cedar");
    }
}
