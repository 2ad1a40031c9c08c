//! Every Lua script of the crate, once: each one a single atomic round trip. The flight's
//! primitives (check-and-lock, store-release, fail-release, extend, take-over, remove) and
//! the lock API's (release, extend).

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

/// Check-and-lock. KEYS[1] value, KEYS[2] lock, KEYS[3] failure marker, KEYS[4] the key's
/// purge generation; ARGV[1] token,
/// ARGV[2] lease ms, ARGV[3] "1" to ignore the value (it was unusable), ARGV[4] the largest
/// value size accepted, in bytes, ARGV[5] the holder token the caller waited on ('' for
/// none).
/// Returns {1, value} | {2, generation} lock taken | {3, pttl, holder's token} held by another |
/// {4, "!F" status} the attempt waited on failed (its marker names that holder).
/// The value is read with one `GETRANGE` of its first ARGV[4] + 1 bytes: one more than
/// the largest accepted tells a value that is larger, which is then treated as absent (so
/// is one that is not a string), so the lock is taken and the fill overwrites it. A lock
/// that is not a string reads as the empty token.
pub(crate) static CHECK_AND_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if ARGV[3] ~= '1' then
    local v = redis.pcall('GETRANGE', KEYS[1], 0, ARGV[4])
    if type(v) == 'string' and #v > 0 and #v <= tonumber(ARGV[4]) then
        return {1, v}
    end
end
if ARGV[5] ~= '' then
    local f = redis.pcall('GET', KEYS[3])
    if type(f) == 'string' and #f > 5 and string.sub(f, 6) == ARGV[5] then
        return {4, string.sub(f, 1, 5)}
    end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    local gen = redis.pcall('GET', KEYS[4])
    if type(gen) ~= 'string' then gen = '0' end
    return {2, gen}
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

/// Store-release-publish. KEYS[1] value, KEYS[2] lock, KEYS[3] the key's purge generation;
/// ARGV[1] token, ARGV[2] bytes, ARGV[3] ttl ms, ARGV[4] channel (the key's), ARGV[5]
/// message, ARGV[6] "1" to append the bytes to the message (waiters then need no read),
/// ARGV[7] the publish command (`PUBLISH`, or `SPUBLISH` on a Cluster), ARGV[8] the
/// generation the fill started under ('' unknown: only where none stands; '*' any),
/// ARGV[9] the key hash in hex; KEYS[4..] the sets of the entry's tags (one node only: a
/// Cluster writes them apart), to which a stored entry is added (each set kept as long as
/// its longest-lived entry).
/// A fill that started before a purge of its key (the generation moved) does not store:
/// its older answer must not resurrect the purged value.
/// A holder writes unless a newer envelope stands; a leader without the lock (its lease
/// lapsed, or Redis did not answer its check) only where nothing or an older envelope
/// stands. Newer is by `stored_at`, read from the standing envelope's header (layout at the
/// top of `cache/entry.rs`: it follows the key) and compared byte by byte, so that writes queued while Redis was
/// frozen cannot replace a later answer with an earlier one, whatever order they run in.
/// The SET runs under `pcall`: a write Redis refuses (out of memory) still releases the
/// lock and publishes, with the bytes inline, so that waiters get the answer anyway.
/// Returns {held 0|1, stored 1 | 0 (something newer stands) | -1 (Redis refused it)}.
pub(crate) static STORE_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local value = ARGV[2]
local held = redis.call('GET', KEYS[2]) == ARGV[1]
local function standing()
    local head = redis.pcall('GETRANGE', KEYS[1], 0, 8)
    if type(head) ~= 'string' then return 'foreign' end
    if #head == 0 then return 'none' end
    if #value < 19 or #head < 9 or string.sub(head, 1, 4) ~= string.sub(value, 1, 4)
        or string.sub(head, 6, 9) ~= string.sub(value, 6, 9) then
        return 'foreign'
    end
    local b1, b2, b3, b4 = string.byte(value, 6, 9)
    local at = ((b1 * 256 + b2) * 256 + b3) * 256 + b4 + 9
    if #value < at + 8 then return 'foreign' end
    local theirs = redis.pcall('GETRANGE', KEYS[1], at, at + 7)
    if type(theirs) ~= 'string' or #theirs < 8 then return 'foreign' end
    for i = 1, 8 do
        local a, b = string.byte(theirs, i), string.byte(value, at + i)
        if a ~= b then
            if a > b then return 'newer' end
            return 'older'
        end
    end
    return 'same'
end
local s = standing()
local stored = 0
local gen = redis.pcall('GET', KEYS[3])
if type(gen) ~= 'string' then gen = false end
local current = ARGV[8] == '*' or (ARGV[8] == '' and not gen) or ARGV[8] == (gen or '0')
if current and ((held and s ~= 'newer') or s == 'none' or s == 'older') then
    local ok = redis.pcall('SET', KEYS[1], value, 'PX', ARGV[3])
    if type(ok) == 'table' and ok.err then stored = -1 else stored = 1 end
end
if stored == 1 then
    for i = 4, #KEYS do
        redis.pcall('SADD', KEYS[i], ARGV[9])
        if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[3]) then
            redis.call('PEXPIRE', KEYS[i], ARGV[3])
        end
    end
end
if held then redis.call('DEL', KEYS[2]) end
if stored ~= 0 and ARGV[6] == '1' then
    redis.call(ARGV[7], ARGV[4], ARGV[5] .. value)
else
    redis.call(ARGV[7], ARGV[4], ARGV[5])
end
if held then return {1, stored} end
return {0, stored}",
    )
});

/// Release-publish, for a fill that produced nothing. KEYS[1] lock; ARGV[1] token,
/// ARGV[2] channel (the key's), ARGV[3] message, ARGV[4] the publish command. Returns 1
/// when the lock was still ours.
pub(crate) static RELEASE_PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local held = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    held = 1
end
redis.call(ARGV[4], ARGV[2], ARGV[3])
return held",
    )
});

/// Fail-release-publish, for a fill whose attempt failed. KEYS[1] lock, KEYS[2] failure
/// marker; ARGV[1] token, ARGV[2] marker value, ARGV[3] marker ttl ms, ARGV[4] channel
/// (the key's), ARGV[5] message, ARGV[6] the publish command. The marker tells the attempt's waiters whose wake-up was lost that it
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
redis.call(ARGV[6], ARGV[4], ARGV[5])
return held",
    )
});

/// A read-only read of a value, for `EVAL_RO` while a write stalls. KEYS[1] value;
/// ARGV[1] the largest length read. Returns the value, or nil when there is none or it is
/// larger (read, as by check-and-lock, no further than one byte past the largest).
pub(crate) const READ_VALUE: &str = r"local v = redis.call('GETRANGE', KEYS[1], 0, ARGV[1])
if #v == 0 or #v > tonumber(ARGV[1]) then return false end
return v";

/// Purge-publish: deletes a value, moves the key's purge generation (a fill that started
/// before it will not store) and tells every node to drop its copy. KEYS[1] value, KEYS[2]
/// generation (one slot); ARGV[1] channel (the broadcast one: a plain `PUBLISH` reaches
/// every node, of a Cluster too), ARGV[2] message (with the purge epoch), ARGV[3]
/// generation ttl ms.
pub(crate) static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"redis.call('DEL', KEYS[1])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[1], ARGV[2])",
    )
});
