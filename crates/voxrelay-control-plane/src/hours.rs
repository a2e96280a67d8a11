//! A tenant's opening hours: what the seed file sets, the store keeps as JSON and the
//! `lookup_business_hours` tool reads out.

use serde::{Deserialize, Serialize};

/// The days of the week in the order [`BusinessHours::days`] uses.
pub const WEEKDAYS: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// When a tenant is open. Stored as JSON in the tenant's row.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusinessHours {
    /// IANA zone name the hours are given in, e.g. `America/New_York`; told to the caller as is.
    pub timezone: String,
    /// Monday first ([`WEEKDAYS`]); `None` is closed all day.
    pub days: [Option<OpenHours>; 7],
}

/// One day's opening hours, `HH:MM` on a 24-hour clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenHours {
    pub opens: String,
    pub closes: String,
}
