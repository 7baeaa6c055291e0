"""
EXAMPLE: the 'first-copy-tally' voter.

It shows the shape of a drop-in voter: a module-level factory providing
C{IPlugin} and C{IVoterFactory}, which makes one voter per channel a
subscriber reads.  The voter decides as 'first-copy' does (CFT: any one
copy is the batch) and also counts, per replica, how many batches that
replica's copy was the first of, which shows the fastest replica.
"""

from zope.interface import implementer

from fit_broker.interfaces import IVoter
from fit_broker.voters import FirstCopyVoter, VoterFactory


@implementer(IVoter)
class TallyVoter(FirstCopyVoter):
    """
    First copy wins; C{counters["first:replica-N"]} counts replica N's wins.
    """

    name = "first-copy-tally"

    def offer(self, replica, batches, now):
        decided = super().offer(replica, batches, now)
        if decided:
            self.count(f"first:replica-{replica}", len(decided))
        return decided


first_copy_tally = VoterFactory(TallyVoter.name, TallyVoter)
