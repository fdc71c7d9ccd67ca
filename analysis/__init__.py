"""Statistics a consortium asks of its sites (`medfed ask`): pure maths, numpy and scipy.

Each analysis is split the same way. A site turns its cohort into *per-patient rows*
(or per-site sums) whose contribution of any one patient is bounded in L2 by a stated
sensitivity; the sites' noisy sums are added up; the coordinator turns the summed
vector into the answer and its confidence interval, which includes the DP noise.
Nothing here knows of Flower, sites' files or the privacy ledger.
"""
