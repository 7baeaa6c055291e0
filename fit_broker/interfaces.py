"""
The seams of FIT Broker, in one place.

Every per-channel component (QoS class, QoP mode, ordering protocol, voter,
protection scheme) is chosen by name from configuration and implements one of
these interfaces.  QoP modes, ordering protocols, voters and protection
schemes are Twisted plugins of the package L{fit_broker.plugins}: objects
providing C{IPlugin} and L{IQoPMode}, L{IOrderingFactory}, L{IVoterFactory}
or L{IProtectionScheme}, found by name with L{fit_broker.registry}.
Implementations are plain objects: none of them performs
I/O or reads a clock, they receive times as ``now`` arguments, and all of them
are used from the reactor thread only.

Events travel in batches, as *wire tuples* in the field order of
L{fit_broker.units.BATCH_FIELDS}::

    (publisher, first_id, timestamp, ttl, urgency, payload, proof)

The payload (the events' contents) stays one byte string from the publisher
to the subscriber: replicas authenticate, queue and forward it without
decoding, voters compare it whole, and only the winning copy is decoded.
"""

from zope.interface import Attribute, Interface


class IQoSClass(Interface):
    """
    A channel's quality of service: urgency levels, ordering, persistence.
    """

    name = Attribute("The class name used in the control table.")
    urgency_levels = Attribute("Number of urgency levels; 0 is the least urgent.")
    ordering = Attribute(
        "The ordering scope: 'none' (no order across publishers), 'channel' "
        "(log order within the channel) or 'global' (log order across every "
        "global channel).  The protocol is the cluster's (L{IOrderingFactory})."
    )
    capacity = Attribute("Events each subscriber's output queue holds at most.")
    max_bytes = Attribute("Bytes (payload and proof) each subscriber's output queue holds at most.")
    ttl = Attribute("Default and maximum time to live of an event, in seconds.")
    overflow = Attribute("'drop-oldest' or 'drop-newest': what a full queue discards.")

    def effective_ttl(requested):
        """
        Return the TTL an event gets: C{requested} capped at L{ttl}, or L{ttl}
        when C{requested} is 0 or negative.
        """


class IQoPMode(Interface):
    """
    A channel's fault model: how many replicas must acknowledge a publish and
    which voters a subscriber may use.
    """

    name = Attribute("The mode's name, as a channel's C{qop} chooses it: 'cft', 'bft' or a plugin's.")

    def check_cluster(replicas, faults):
        """
        Raise L{fit_broker.errors.ConfigError} unless C{replicas} replicas can
        tolerate C{faults} faults in this mode.
        """

    def acks_needed(replicas, faults):
        """
        Return how many replicas must accept a publish before the publisher is
        told it succeeded.
        """

    def default_voter():
        """
        Return the name of the voter subscribers use unless the channel names one.
        """


class IOrderingProtocol(Interface):
    """
    One replica's side of the agreement on an ordered log of values
    (L{fit_broker.agreement.engine.Orderer}): a sans-IO object fed values,
    peer messages and the time, answering with
    L{fit_broker.agreement.effects.Effects} (messages to send, decided
    instances, a state to restore, checkpoints to take).
    """

    name = Attribute("The protocol's name: 'mod-smart' (Byzantine) or 'multi-paxos' (crash).")

    def submit(values, now):
        """
        Offer value tuples this replica holds, to be ordered.

        @return: L{Effects}.
        """

    def receive(sender, message, now):
        """
        Handle C{message} (bytes) from replica C{sender}, already
        authenticated by the link; malformed messages are counted drops.

        @return: L{Effects}.
        """

    def tick(now):
        """
        Let time pass (timers, re-sending); call it every 50 ms or so.

        @return: L{Effects}.
        """

    def checkpoint(instance, state, now):
        """
        Take the application's state snapshot after C{instance}, as an
        earlier L{Effects} asked.

        @return: L{Effects}.
        """

    def status():
        """
        Return a dict: regency, leader, last decided instance, stable
        checkpoint and counters.
        """


class IJournalledOrdering(IOrderingProtocol):
    """
    An ordering protocol that keeps what it must not forget across a
    restart in a journal its caller makes durable (built with the option
    C{journal=True}): its L{fit_broker.agreement.effects.Effects} carry
    C{journal} records, durable before the messages beside them leave.
    """

    def resume(records, now):
        """
        Rebuild the protocol's state from the journal C{records} (bytes, in
        the order they were written) after a restart; call it once, first.

        @return: L{Effects}, e.g. the state and decided instances to apply.
        @raise ValueError: a record is not one this protocol wrote.
        """


class IOrderingFactory(Interface):
    """
    Makes the cluster's ordering protocol at one replica: one replicated log
    per cluster, named by C{[cluster] orderer}.
    """

    name = Attribute("The protocol's name, as C{[cluster] orderer} chooses it.")
    byzantine = Attribute("True when it tolerates Byzantine replicas, False for crashes only.")

    def check_cluster(replicas, faults):
        """
        Raise L{fit_broker.errors.ConfigError} unless C{replicas} replicas
        can run this protocol tolerating C{faults} faults.
        """

    def __call__(index, replicas, faults, crypto, **options):
        """
        Return the L{IOrderingProtocol} provider of replica C{index}.

        @param crypto: this replica's signing and verifying (see
            L{fit_broker.agreement.crypto}).
        @param options: keyword arguments a protocol may use or ignore:
            C{validate} (a value's shape check), C{clock_skew},
            C{checkpoint_interval}, C{leader_timeout}, C{journal} (see
            L{IJournalledOrdering}).
        """


class IVoter(Interface):
    """
    Combines the copies of batches that replicas send to one subscriber.

    A voter never delivers a batch twice, never delivers one whose TTL has
    passed (nor holds one longer than the channel class's TTL), and keeps its
    memory of pending copies within bounds in batches and bytes.  It never
    turns slowness into loss: a copy it cannot decide on yet holds its
    replica's credit (L{release} says when that is free again), and a batch
    it evicted or lacks in full is named by L{wanted} to be fetched.
    """

    name = Attribute("The voter's name, as configuration chooses it.")
    counters = Attribute("A dict of reason -> number of copies dropped or batches delivered.")
    holds_copies = Attribute(
        "True when copies may wait undecided, so their credit is freed only "
        "through L{release}; False when every copy is done with once offered."
    )
    fetch_ready = Attribute("True when L{wanted} has batches to fetch now.")

    def offer(replica, batches, now):
        """
        Take wire batches that replica number C{replica} pushed.

        @return: the list of wire batches that are now decided, in arrival
            order; each is returned once in the voter's lifetime.
        """

    def offer_fetched(replica, batches, now):
        """
        Take full copies replica C{replica} sent in answer to a fetch.

        @return: the wire batches now decided.
        """

    def wanted(now):
        """
        Return C{(key, replicas)} pairs: the batches to fetch now, and the
        replicas to ask (C{None}: all of them).
        """

    def release():
        """
        Return C{{replica: (events, bytes)}}: the credit of the copies the
        voter is done with since the last call.
        """

    def take_acks():
        """
        Return C{(replica, key)} pairs for copies of batches already
        delivered, which that replica may still hold.
        """

    def take_dropped():
        """
        Return C{(replica, key)} pairs for undecided batches evicted from
        that replica's share, which it may forget.
        """

    def forget_replica(replica):
        """
        Drop the copies of a replica whose link went down; it sends them
        again when it is back.
        """

    def expire(now):
        """
        Drop pending copies whose TTL has passed, counting them.
        """


class IVoterFactory(Interface):
    """
    Makes the voter of one channel of one subscriber: voters hold state per
    subscriber, so the plugin is this factory, not a voter.
    """

    name = Attribute("The voter's name, as a channel's C{voter} chooses it.")

    def __call__(faults=0, **context):
        """
        Return a new L{IVoter} provider for a cluster tolerating C{faults}
        faulty replicas.

        @param context: keyword arguments a voter may use or ignore:
            C{scheme} and C{keys} (to check batches), C{channel},
            C{replicas}, C{publishers}, C{memory} (a L{fit_broker.dedup.RecentIds}
            of what was delivered before), C{max_ttl} and C{window} (the
            C{(events, bytes)} credit each replica is given).  A voter must
            accept keywords it does not know.
        """


class IOrderedVoter(Interface):
    """
    Combines the entries replicas push for one subscriber of one ordered
    channel into one gapless sequence, in sequence-number order.

    An entry is C{(position, seq, batch, note, span)}: a batch (note C{""})
    or a tombstone covering C{seq .. seq+span-1}.  Sequence number C{s} is
    decided only after every number below it was: delivered once C{needed}
    replicas sent matching C{(position, seq, header, digest)} and a full
    copy with that digest is at hand (fetched when only digests came), or
    skipped once C{needed} replicas sent tombstones covering it; never
    skipped otherwise.  Each replica's copies are bounded by its credit
    window in events and bytes.  Decisions come out as items with
    C{position}, C{seq}, C{end} (the next number after it), C{batch} (the
    full wire batch, or C{None} when skipped), C{note} and C{acks}
    (C{(replica or None for all, key)} to acknowledge once the item is
    handled).
    """

    name = Attribute("The voter's name.")
    needed = Attribute("Matching copies a decision needs: f+1 (BFT) or 1 (CFT).")
    next_seq = Attribute("The next sequence number to decide, or C{None} before the start is known.")
    counters = Attribute("A dict of reason -> count; C{reason:replica-N} names a replica's misdeeds.")
    holds_copies = Attribute("Always True: copies hold their replica's credit until L{release}.")
    fetch_ready = Attribute("True when L{wanted} has batches to fetch now.")

    def start_from(position):
        """
        Start at the first entry at log position C{position} or later:
        entries before it are acknowledged and not delivered.  Only before
        the first entry is offered.
        """

    def offer(replica, entries, now, costs=None):
        """
        Take entries replica C{replica} pushed, in its sending order;
        C{costs} are their C{(events, bytes)} when the caller counted them.

        @return: the items now decided, in sequence order.
        """

    def note_watermark(replica, watermark):
        """
        Note the log position up to which C{replica} says it sent every entry.
        """

    def settled():
        """
        Return the highest log position up to which this channel has no
        entry left to decide (C{needed} replicas agree), or -1.
        """

    def resume_position():
        """
        Return the log position to ask replicas to stream from, or C{None}.
        """

    def offer_fetched(replica, batches, now):
        """
        Take full copies sent in answer to a fetch; return the items now decided.
        """

    def wanted(now):
        """
        Return C{(key, replicas)} pairs of batches to fetch now.
        """

    def expire(now):
        """
        Decide what waits on a batch whose TTL passed; return the items.
        """

    def release():
        """
        Return C{{replica: [events, bytes]}}, the credit freed since the last call.
        """

    def take_acks():
        """
        Return C{(replica, key)} pairs for copies of entries already decided.
        """

    def take_dropped():
        """
        Return C{(replica, key)} pairs for copies given up undecided (none).
        """

    def take_reopen(now):
        """
        Return the replicas whose stream to reopen: copies of theirs that
        were dropped (out of order, beyond their window) are needed now.
        """

    def forget_replica(replica):
        """
        Drop a replica's copies: its link went down or its stream is reopened.
        """


class IProtectionScheme(Interface):
    """
    How events of a channel are authenticated (and perhaps encrypted).

    Schemes are Twisted plugins: providers of this interface found by
    C{twisted.plugin.getPlugins(IProtectionScheme, fit_broker.plugins)}.
    A scheme works on whole batches, so a MAC, signature or cipher is paid
    once per batch and never per event.  Batches are wire tuples.
    """

    name = Attribute("The name channels use to select this scheme.")
    subscriber_verifiable = Attribute(
        "True when a subscriber can check a batch on its own (signatures), "
        "so a signature-checking voter may deliver a single verified copy."
    )

    def protect(keys, channel, batch):
        """
        Publisher side: return C{batch} with its payload transformed (PKE
        encrypts it) and its proof filled.
        """

    def check_batch(keys, channel, publisher, batch):
        """
        Replica side: return C{None} when C{batch} is authentic for this
        replica (C{keys.replica_index}), or a short reason string, which the
        replica counts and logs.
        """

    def check_delivered(keys, channel, batch):
        """
        Subscriber side: return C{None} when C{batch} verifies on its own, or
        a reason string.  Schemes that are not subscriber-verifiable return
        C{None}; the voter's quorum protects their batches.
        """

    def open(keys, channel, batch):
        """
        Subscriber side: return the list of the batch's plaintext contents.

        @raise ValueError: when it cannot be opened (wrong or missing key,
            malformed payload).
        """


class IKeyRing(Interface):
    """
    The secrets and public keys one party (replica or client) holds.
    """

    identity = Attribute("The party's name: a client name or 'replica-N'.")

    def mac_key(publisher, replica):
        """
        Return the MAC key C{publisher} shares with replica number
        C{replica}, or C{None} when this party does not hold it.
        """

    def signing_key(publisher):
        """
        Return C{publisher}'s Ed25519 private key, or C{None}.
        """

    def verify_key(publisher):
        """
        Return C{publisher}'s Ed25519 public key, or C{None}.
        """

    def channel_key(channel):
        """
        Return the symmetric key of C{channel}, or C{None}.
        """

    replica_signing_key = Attribute(
        "A replica's Ed25519 private key for the agreement's certificates, or None."
    )

    def peer_mac_key(replica):
        """
        Return the MAC key this replica shares with replica number
        C{replica} for their link, or C{None}.
        """

    def replica_verify_key(replica):
        """
        Return replica number C{replica}'s Ed25519 public key, or C{None}.
        """


class IControlTable(Interface):
    """
    The control table as replicated state: channels and who may use them,
    changed only by administrators' signed changes applied in log order.
    Deterministic: no clock, no I/O, so equal changes give equal tables.
    """

    version = Attribute("Changes applied since the genesis table (version 0).")
    admins = Attribute("The clients whose signed changes are accepted.")
    channels = Attribute("A read-only mapping of tag -> ChannelSpec.")

    def apply(admin, change_bytes, signature, verify_key_of):
        """
        Apply one signed change; return C{(ok, text)}.  A refused change
        changes nothing but a refusal counter.
        """

    def snapshot():
        """
        Return the table as deterministic bytes (restored by the
        implementation's C{restore(data, classes)}).
        """

    def diff(old):
        """
        Return what changed from the channels mapping C{old} to now:
        created, removed and updated channel specs.
        """

    def describe():
        """
        Return the table as plain data, equal on every correct replica at
        one version.
        """


class IStorage(Interface):
    """
    A flat folder of append-only files: the seam between the segment log
    and a disk, so crash tests can run the log on a fake that forgets what
    was not synced.  Calls block (a real disk) and fail with
    L{fit_broker.storage.StorageError}, one line naming the file, C{.full}
    set for a full disk.  Names are plain file names (no separators).
    """

    def files():
        """
        Return the names of the files in the folder, sorted.
        """

    def append(name, data):
        """
        Append the bytes C{data} to C{name}, creating it (even for empty
        C{data}) if missing.  Not durable until L{sync}.  After a failure
        part of C{data} may have been written.
        """

    def sync(name):
        """
        Make everything appended to C{name} durable, and its folder entry if
        the file was created since.  After a failure what is on disk is
        unknown: do not retry, reopen.
        """

    def read(name, offset, size):
        """
        Return up to C{size} bytes of C{name} from C{offset} (fewer at the
        end of the file), unsynced ones included.
        """

    def size(name):
        """
        Return the length of C{name} in bytes.
        """

    def truncate(name, size):
        """
        Cut C{name} to C{size} bytes, durably when this returns.
        """

    def delete(name):
        """
        Remove C{name} (nothing if missing), durably when this returns.
        """

    def close():
        """
        Release open file handles; later calls reopen what they need.
        """


class ISegmentLog(Interface):
    """
    An append-only log of checksummed records, numbered from
    L{first_index} to L{next_index}, kept in segment files on an
    L{IStorage}, with group commit, retention and crash recovery.  No clock:
    calls that need the time take C{now}.
    """

    first_index = Attribute("The index of the oldest record held.")
    next_index = Attribute("The index the next appended record gets.")
    size_bytes = Attribute("The bytes of every segment held.")
    fsync = Attribute('The fsync policy: "always", "interval" or "never".')
    sync_deadline = Attribute(
        "When the fsync policy wants the next sync, or None (nothing pending, or the "
        '"never" policy); an adapter calls tick(now) then.'
    )
    recovery = Attribute("The Recovery report of opening the log, or None before recover().")
    failed = Attribute("The StorageError that stopped the log (reopen it to recover), or None.")

    def recover():
        """
        Scan and check every segment once, at open; cut damage and return a
        C{Recovery} report of what was kept, cut and lost.
        """

    def append(payload, now, timestamp=None):
        """
        Append one record (C{timestamp}, the record's own time for
        retention by age, defaults to C{now}); return its index.  Durable
        only after a sync.
        """

    def pending_sync():
        """
        Return how many appended records no sync has covered yet.
        """

    def sync(now):
        """
        Make every record appended so far durable; return how many records
        it covered (group commit).
        """

    def tick(now):
        """
        Sync if the fsync policy's deadline has come; return the records
        covered.
        """

    def read_from(index, end=None):
        """
        Iterate C{(index, timestamp, payload)} from C{index} up to the end
        as of this call (or C{end}); indexes jump over gaps.
        """

    def gaps():
        """
        Return the index ranges C{(first, end)} missing between segments
        (lost to damage, until filled).
        """

    def fill(first_index, records, now):
        """
        Write C{(timestamp, payload)} records recovered from peers into the
        gap starting at C{first_index}, durably; return how many.
        """

    def trim(now, keep_after_index=None):
        """
        Drop whole oldest segments past the age or bytes bound, keeping any
        that hold a record above C{keep_after_index}; return a C{Trimmed}
        report (expired and overflow records and bytes, index range).
        """

    def stats():
        """
        Return the log's figures (records, bytes, syncs, records per sync)
        as plain data.
        """

    def close(now):
        """
        Sync what is pending, under any policy, and stop.
        """
