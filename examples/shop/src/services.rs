//! The shop's four services, as one list: what the demo starts and what the checks read.

use crate::platform::ServiceDef;
use crate::{cart, catalog, orders, users};

/// The four services, in the order they start (orders calls cart's API, so cart comes first).
pub const SERVICES: [&ServiceDef; 4] = [
    &users::SERVICE,
    &catalog::SERVICE,
    &cart::SERVICE,
    &orders::SERVICE,
];
