//! Policies partitioned by scope, so a decision evaluates only the policies whose scope can
//! match the request instead of the whole bundle.
//!
//! Cedar evaluates every policy of a `PolicySet`; with thousands of per-route or per-caller
//! policies that is linear in the bundle. A policy is filed under the action, resource and
//! principal its scope names (`== X`, `in X`, `is T in X`; an action group files it under
//! each member action), or under "any". A request looks up at most
//! 2 (action) × 2 (route) × (2 + its groups) buckets and combines their answers with Cedar's
//! rule: deny if any `forbid` is satisfied, else allow if any `permit` is, else deny.
//! Leaving out a policy whose scope cannot match changes nothing: Cedar would find its scope
//! false without evaluating its conditions (so it could not error either).

use std::collections::HashMap;

use crate::conditions::{Bucket, Paths};
use cedar_policy::{
    ActionConstraint, Authorizer, Entities, EntityUid, PolicyId, PolicySet, PrincipalConstraint,
    Request, ResourceConstraint,
};

/// One level of the index: policies for any value, and per named value.
#[derive(Debug)]
struct Level<T> {
    any: Option<T>,
    by: HashMap<EntityUid, T>,
}

impl<T> Default for Level<T> {
    fn default() -> Self {
        Self {
            any: None,
            by: HashMap::new(),
        }
    }
}

impl<T: Default> Level<T> {
    fn slot(&mut self, key: Option<&EntityUid>) -> &mut T {
        match key {
            None => self.any.get_or_insert_with(T::default),
            Some(uid) => self.by.entry(uid.clone()).or_default(),
        }
    }
}

/// Action → route → principal → policies (filed further by condition, see
/// [`crate::conditions`]).
#[derive(Debug, Default)]
pub struct PolicyIndex {
    root: Level<Level<Level<Bucket>>>,
    buckets: usize,
    paths: Paths,
    /// Policies a request can leave out without evaluating them: filed under a route, a
    /// principal (or group) or a condition.
    indexed: usize,
    /// Of those, policies filed under a condition.
    by_condition: usize,
    policies: usize,
}

/// What a request's scope lookups need: its action, route, principal and the principal's
/// ancestors (groups).
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The action.
    pub action: &'a EntityUid,
    /// The route (resource).
    pub route: &'a EntityUid,
    /// The principal.
    pub principal: &'a EntityUid,
    /// Every group the principal is in, transitively.
    pub ancestors: &'a [EntityUid],
}

/// The combined answer of the buckets a request touched.
#[derive(Debug, Default)]
pub struct Evaluation {
    /// Cedar's decision over all of them.
    pub allowed: bool,
    /// Determining policies: the satisfied `forbid`s on a deny, the satisfied `permit`s on an
    /// allow, none on a default deny. Sorted.
    pub reasons: Vec<PolicyId>,
    /// Policies skipped because their evaluation errored.
    pub errors: Vec<String>,
}

impl crate::bundle::Bundle {
    /// How the bundle's policies are indexed.
    pub fn policy_index(&self) -> &PolicyIndex {
        &self.index
    }
}

impl PolicyIndex {
    /// Files every policy of `policies`. `members` gives, for an action group, every action in
    /// it (itself included).
    pub fn new(
        policies: &PolicySet,
        members: impl Fn(&EntityUid) -> Vec<EntityUid>,
    ) -> Result<Self, String> {
        let mut index = Self::default();
        for policy in policies.policies() {
            let actions: Vec<Option<EntityUid>> = match policy.action_constraint() {
                ActionConstraint::Any => vec![None],
                ActionConstraint::Eq(action) => vec![Some(action)],
                ActionConstraint::In(groups) => {
                    let mut actions: Vec<EntityUid> = groups.iter().flat_map(&members).collect();
                    actions.sort_by_key(ToString::to_string);
                    actions.dedup();
                    actions.into_iter().map(Some).collect()
                }
            };
            let resource = match policy.resource_constraint() {
                ResourceConstraint::Any | ResourceConstraint::Is(_) => None,
                ResourceConstraint::Eq(uid)
                | ResourceConstraint::In(uid)
                | ResourceConstraint::IsIn(_, uid) => Some(uid),
            };
            let principal = match policy.principal_constraint() {
                PrincipalConstraint::Any | PrincipalConstraint::Is(_) => None,
                PrincipalConstraint::Eq(uid)
                | PrincipalConstraint::In(uid)
                | PrincipalConstraint::IsIn(_, uid) => Some(uid),
            };
            let mut by_condition = false;
            for action in &actions {
                let bucket = index
                    .root
                    .slot(action.as_ref())
                    .slot(resource.as_ref())
                    .slot(principal.as_ref());
                if bucket.is_empty() {
                    index.buckets += 1;
                }
                let before = bucket.indexed();
                bucket.add(policy.clone(), &mut index.paths)?;
                by_condition |= bucket.indexed() > before;
            }
            index.policies += 1;
            index.by_condition += usize::from(by_condition);
            if by_condition || resource.is_some() || principal.is_some() {
                index.indexed += 1;
            }
        }
        Ok(index)
    }

    /// Number of policies a request can leave out without evaluating them (filed under a
    /// route, a principal or group, or a condition), and of those, the ones filed under a
    /// condition. The rest (whatever their action) are evaluated for every request of
    /// their action.
    pub fn indexed(&self) -> (usize, usize) {
        (self.indexed, self.by_condition)
    }

    /// Number of policies filed.
    pub fn policies(&self) -> usize {
        self.policies
    }

    /// Number of non-empty buckets.
    pub fn buckets(&self) -> usize {
        self.buckets
    }

    /// Decides `request` with the policies whose scope can match `scope`.
    pub fn evaluate(
        &self,
        authorizer: &Authorizer,
        request: &Request,
        entities: &Entities,
        scope: &Scope<'_>,
    ) -> Evaluation {
        let Scope {
            action,
            route,
            principal,
            ancestors,
        } = scope;
        let mut forbids: Vec<PolicyId> = Vec::new();
        let mut permits: Vec<PolicyId> = Vec::new();
        let mut errors = Vec::new();
        let mut sets: Vec<&PolicySet> = Vec::new();
        let actions = [self.root.by.get(*action), self.root.any.as_ref()];
        for by_route in actions.into_iter().flatten() {
            for by_principal in [by_route.by.get(*route), by_route.any.as_ref()]
                .into_iter()
                .flatten()
            {
                let principals = std::iter::once(by_principal.any.as_ref())
                    .chain(std::iter::once(by_principal.by.get(*principal)))
                    .chain(ancestors.iter().map(|a| by_principal.by.get(a)));
                for bucket in principals.flatten() {
                    bucket.candidates(request.context(), &self.paths, &mut sets);
                }
            }
        }
        {
            {
                for set in sets {
                    let response = authorizer.is_authorized(request, set, entities);
                    let diagnostics = response.diagnostics();
                    errors.extend(diagnostics.errors().map(ToString::to_string));
                    match response.decision() {
                        cedar_policy::Decision::Allow => {
                            permits.extend(diagnostics.reason().cloned());
                        }
                        // A deny with reasons names satisfied forbids; without, no policy
                        // of this bucket applied.
                        cedar_policy::Decision::Deny => {
                            forbids.extend(diagnostics.reason().cloned());
                        }
                    }
                }
            }
        }
        let (allowed, mut reasons) = if !forbids.is_empty() {
            (false, forbids)
        } else {
            (!permits.is_empty(), permits)
        };
        reasons.sort_by_cached_key(ToString::to_string);
        reasons.dedup();
        errors.sort();
        errors.dedup();
        Evaluation {
            allowed,
            reasons,
            errors,
        }
    }
}
