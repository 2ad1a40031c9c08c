//! The Lua scripts: each one a single atomic round trip.

use redis::Script;
use std::sync::LazyLock;

/// Compare-and-delete. KEYS[1] lock; ARGV[1] token. Returns 1 when deleted.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

/// Compare-and-pexpire. KEYS[1] lock; ARGV[1] token, ARGV[2] lease ms. Returns 1 when extended.
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0",
    )
});

/// Check-and-lock. KEYS[1] value, KEYS[2] lock; ARGV[1] token, ARGV[2] lease ms,
/// ARGV[3] "1" to ignore the value (it was unusable), ARGV[4] the largest value size
/// accepted, in bytes.
/// Returns {1, value} | {2} lock taken | {3, pttl, holder's token} held by another.
/// A value larger than ARGV[4] (or not a string) is never read: it is treated as absent, so
/// the lock is taken and the fill overwrites it. A lock that is not a string reads as the
/// empty token.
pub(crate) static CHECK_AND_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if ARGV[3] ~= '1' then
    local n = redis.pcall('STRLEN', KEYS[1])
    if type(n) == 'number' and n > 0 and n <= tonumber(ARGV[4]) then
        return {1, redis.call('GET', KEYS[1])}
    end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {2}
end
local holder = redis.pcall('GET', KEYS[2])
if type(holder) ~= 'string' then holder = '' end
return {3, redis.call('PTTL', KEYS[2]), holder}",
    )
});

/// Compare-and-set, to take over a lock no holder of ours could have left (no expiry, or a
/// TTL past the lease). KEYS[1] lock; ARGV[1] the stale holder's token (the empty token for
/// a lock that is not a string), ARGV[2] new token, ARGV[3] lease ms. Returns 1 when taken.
pub(crate) static TAKE_OVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local held = redis.pcall('GET', KEYS[1])
if not held then return 0 end
if type(held) ~= 'string' then held = '' end
if held == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return 1
end
return 0",
    )
});

/// Store-release-publish. KEYS[1] value, KEYS[2] lock; ARGV[1] token, ARGV[2] bytes,
/// ARGV[3] ttl ms, ARGV[4] channel, ARGV[5] message, ARGV[6] "1" to append the stored
/// bytes to the message (waiters then need no read).
/// A holder overwrites; a leader whose lease lapsed only writes where nothing newer stands.
/// Returns {held 0|1, stored 0|1}.
pub(crate) static STORE_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local held = redis.call('GET', KEYS[2]) == ARGV[1]
local stored = 0
if held then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    redis.call('DEL', KEYS[2])
    stored = 1
elseif redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then
    stored = 1
end
if stored == 1 and ARGV[6] == '1' then
    redis.call('PUBLISH', ARGV[4], ARGV[5] .. ARGV[2])
else
    redis.call('PUBLISH', ARGV[4], ARGV[5])
end
if held then return {1, stored} end
return {0, stored}",
    )
});

/// Release-publish, for a fill that produced nothing. KEYS[1] lock; ARGV[1] token,
/// ARGV[2] channel, ARGV[3] message. Returns 1 when the lock was still ours.
pub(crate) static RELEASE_PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local held = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    held = 1
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return held",
    )
});

/// Fail-release-publish, for a fill whose attempt failed. KEYS[1] lock, KEYS[2] failure
/// marker; ARGV[1] token, ARGV[2] marker value, ARGV[3] marker ttl ms, ARGV[4] channel,
/// ARGV[5] message. The marker tells the attempt's waiters whose wake-up was lost that it
/// failed; a refused marker write (OOM) never skips the release or the wake-up.
/// Returns 1 when the lock was still ours.
pub(crate) static FAIL_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"redis.pcall('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local held = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    held = 1
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return held",
    )
});
