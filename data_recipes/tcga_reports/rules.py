"""The rules that decide what of a pathology report an H&E slide can show; each has a name for the audit.

Two levels. Section headers (`GROSS DESCRIPTION:`, `CLINICAL HISTORY:` ...) switch the current section,
and everything in a dropped section is dropped under `section:<kind>`. In every other section, each
sentence (or synoptic `Key: value` line) is dropped by the first sentence rule that matches, in the
order of `SENTENCE_RULES`; what no rule matches is kept. README.md lists the rules with examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------ sections

KEEP = "keep"
# Normalised header (lower case, single spaces, no trailing colon) → section kind. KEEP sections are
# filtered sentence by sentence; every other kind is dropped whole as `section:<kind>`.
SECTION_HEADERS: dict[str, str] = {}
for _kind, _names in {
    KEEP: ["diagnosis", "diagnoses", "final diagnosis", "final diagnoses", "pathologic diagnosis",
           "pathological diagnosis", "final pathologic diagnosis", "surgical pathology diagnosis",
           "microscopic description", "microscopic", "microscopic examination", "microscopic findings",
           "histology", "histopathology", "comment", "comments", "note", "notes", "summary", "synoptic report",
           "synopsis", "tumor summary", "tumour summary", "cancer summary", "addendum", "interpretation",
           "impression", "additional findings"],
    "clinical_history": ["clinical history", "clinical information", "clinical data", "clinical diagnosis",
                         "clinical notes", "clinical impression", "history", "patient history",
                         "brief clinical history", "indication", "indications", "reason for referral",
                         "preoperative diagnosis", "pre-operative diagnosis", "postoperative diagnosis",
                         "post-operative diagnosis", "operative diagnosis", "operative findings", "symptoms",
                         "treatment history"],
    "gross": ["gross description", "gross", "gross examination", "gross findings", "macroscopic description",
              "macroscopic", "macroscopy", "specimen description", "cassette summary", "cassette key",
              "block summary", "section code", "summary of sections", "ink code"],
    "specimen": ["specimen", "specimens", "specimen(s)", "specimens received", "specimen received",
                 "specimen(s) received", "specimens submitted", "specimen submitted", "source of specimen",
                 "specimen source", "procedure", "procedures", "operation", "tissue submitted",
                 "material submitted", "received"],
    "intraoperative": ["intraoperative consultation", "intraoperative diagnosis", "frozen section",
                       "frozen section diagnosis", "frozen section consultation", "touch prep", "quick section"],
    "ancillary": ["immunohistochemistry", "immunohistochemical stains", "immunohistochemical studies",
                  "immunostains", "special stains", "molecular studies", "molecular results",
                  "molecular pathology", "ancillary studies", "biomarkers", "receptor status", "her2 results",
                  "flow cytometry", "cytogenetics"],
    "administrative": ["electronically signed by", "signed by", "signed out by", "pathologist",
                       "attending pathologist", "resident", "accession number", "accession", "case number",
                       "date", "date of procedure", "date received", "date reported", "date collected",
                       "collected", "report date", "dictated by", "transcribed by", "reviewed by", "verified by", "physician", "ordering physician", "surgeon", "patient name",
                       "patient", "name", "mrn", "dob", "date of birth", "disclaimer"],
    "staging": ["pathologic staging", "pathological staging", "pathologic stage", "staging", "tnm",
                "pathologic staging (ptnm)", "ajcc stage", "ajcc staging"],
}.items():
    for _name in _names:
        SECTION_HEADERS[_name] = _kind

# A line `Header: rest` with a short key; the key decides (SECTION_HEADERS) or is kept as synoptic text.
HEADER_RE = re.compile(r"^\s*(?P<head>[A-Za-z][A-Za-z0-9 ,/&()'\-]{0,60}?)\s*:\s*(?P<rest>.*)$")


def section_kind(header: str) -> str | None:
    """The kind of a section header, or None when it is not one (e.g. a synoptic key)."""
    key = re.sub(r"\s+", " ", header.strip().lower()).rstrip(":").strip()
    return SECTION_HEADERS.get(key)


# ---------------------------------------------------------------------------------------- sentences


@dataclass(frozen=True)
class Rule:
    """Drop a sentence when `pattern` matches and `unless` (when given) does not."""

    name: str
    pattern: re.Pattern[str]
    unless: re.Pattern[str] | None = None
    why: str = ""

    def matches(self, sentence: str) -> bool:
        return bool(self.pattern.search(sentence)) and not (self.unless and self.unless.search(sentence))


def _ci(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{a})" for a in alternatives), re.IGNORECASE)


def _cs(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
FINDING_RE = _ci(r"\b(?:\w*carcinoma|\w*oma|tumou?r|neoplas\w*|malignan\w*|benign|dysplas\w*|atypi\w*|invasi\w*|"
               r"grade|necros\w*|mitos\w*|mitotic|margins?|negative|positive|present|absent|seen|identified|"
               r"shows?|consistent|metasta\w*|hyperplas\w*|inflamm\w*|fibros\w*|no evidence)\b")

SENTENCE_RULES: tuple[Rule, ...] = (
    Rule("administrative", _ci(
        r"\b(?:accession|case\s*(?:no|number|#)|specimen\s*(?:no|number|#)|MRN|medical record|"
        r"report (?:date|status)|date (?:of|received|collected|reported|signed)|signed out|"
        r"electronically signed|e-?signed|dictated|transcribed|verified by|reviewed by|attending pathologist|"
        r"pathologist\s*:|laboratory director|CLIA|this (?:test|assay) was developed|cleared or approved|"
        r"page \d+ of \d+|TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})",
        r"^\s*(?:surgical |anatomic )?patholog\w*(?: and cytology)? (?:report|consultation)\b",
        r"^\s*(?:final|amended|corrected|revised) report\s*\.?$",
        r"\b\d{1,2}/\d{1,2}/\d{2,4}\b", r"\b\d{4}-\d{2}-\d{2}\b", rf"\b{_MONTH}\s+\d{{1,2}},?\s+\d{{4}}\b"),
        why="accession numbers, dates, names and signatures say nothing about the tissue"),
    Rule("administrative", _cs(r"\b[A-Z]{1,3}\d{0,2}-\d{2}-?\d{3,}\b", r"\b[A-Z]{1,3}-\d{4,}\b",
                               r"(?:,\s*|\s)(?:M\.D\.|MD|D\.O\.|Ph\.D\.|PhD|FRCPC?)(?=\W|$)", r"\bDr\.\s*[A-Z]"),
         why="accession-number patterns (S11-12345), degrees after a name, 'Dr. X'"),
    Rule("patient_history", _ci(
        r"\b\d{1,3}[- ]?(?:year|yr)s?[- ]?old\b", r"\by/?o\b", r"\bpatient\b", r"\bpt\.? (?:is|has|was)\b",
        r"\bhistory of\b", r"\bh/o\b", r"\bpresent(?:s|ed)? with\b", r"\bcomplain", r"\bprior (?:diagnosis|biopsy|"
        r"surgery|resection|history|excision)\b", r"\bpreviously (?:diagnosed|treated|resected|biopsied)\b",
        r"\bstatus post\b", r"\bs/p\b", r"\bneoadjuvant\b", r"\bchemo(?:therapy|radiation)?\b",
        r"\bradiation therapy\b", r"\bradiotherapy\b", r"\bfamily history\b", r"\bsmok(?:er|ing)\b",
        r"\b(?:pre|post|peri)menopausal\b", r"\bgravida\b", r"^\s*(?:age|sex|gender|race)\s*:"),
        why="patient history and treatment are not on the slide"),
    Rule("clinical_note", _ci(
        r"\bclinical(?:ly)?\b", r"\bcorrelat(?:e|ion) with\b", r"\brecommend(?:ed)?\b", r"\bfollow-?up\b",
        r"\bplease (?:see|refer|correlate|note)\b", r"\bdiscussed with\b", r"\bnotified\b", r"\bcalled to\b",
        r"\bcommunicated\b", r"\bper (?:the )?(?:surgeon|clinician|requisition)\b", r"\bpre-?operative\b",
        r"\bimaging\b", r"\bradiolog\w*", r"\bmammogra\w*", r"\bCT scan\b", r"\bMRI\b", r"\bultrasound\b",
        r"\bPET\b"),
        why="clinical notes, recommendations and imaging are not on the slide"),
    Rule("intraoperative", _ci(r"\bfrozen section\b", r"\bintra-?operative\b", r"\btouch prep", r"\bFSD?\s*:"),
         why="frozen-section findings come from another slide"),
    Rule("ancillary_test", _ci(
        r"\bimmunohisto\w*", r"\bimmunostain\w*", r"\bimmunoreactiv\w*", r"\bimmunoprofile\b",
        r"\bstains? (?:is|are|was|were|show|shows|reveal)\b", r"\bstain(?:ed|ing)? (?:positive|negative)\b",
        r"\bestrogen receptor\b", r"\bprogesterone receptor\b", r"\bHER-?2(?:/neu)?\b", r"\bKi-?67\b",
        r"\bMIB-?1\b", r"\bp53\b", r"\bp16\b", r"\bPD-?L1\b", r"\bAllred\b", r"\bH-?score\b",
        r"\bin situ hybridi[sz]ation\b", r"\bsequencing\b", r"\bmutation\w*", r"\bmutated\b",
        r"\bwild[- ]type\b", r"\bamplifi\w*", r"\bmicrosatellite\b", r"\bmismatch repair\b", r"\bOncotype\b",
        r"\bspecial stains?\b", r"\bmucicarmine\b", r"\btrichrome\b", r"\breticulin\b", r"\bcongo red\b",
        r"\bZiehl\b", r"\bsynaptophysin\b", r"\bchromogranin\b", r"\bcytokeratin\b", r"\bvimentin\b",
        r"\bcalretinin\b", r"\bdesmin\b", r"\bnapsin\b", r"^\s*(?:ER|PR|HER2|ER status|PR status)\b",
        r"\b(?:positive|negative|reactive|immunoreactive) for (?!(?:[\w-]+ ){0,2}(?:\w*carcinoma|malignan\w*|"
        r"tumou?r|dysplas\w*|metasta\w*|neoplas\w*|lymphovascular|vascular|perineural|invasi\w*|atypi\w*|"
        r"necros\w*|in situ|lesion|residual|\w*oma)\b)"),
        why="immunohistochemistry, special stains and molecular results cannot be seen on H&E"),
    Rule("ancillary_test", _cs(
        r"\b(?:IHC|ISH|FISH|CISH|SISH|PCR|NGS|MSI(?:-H|-L)?|MSS|MMR|MLH1|MSH2|MSH6|PMS2|EGFR|KRAS|NRAS|BRAF|"
        r"IDH[12]?|MGMT|ALK|ROS1|PAS|GMS|AFB|TTF-?1|CK ?\d+|CD ?\d+[a-z]?|S-?100|GATA-?3|PAX-?8|WT-?1|"
        r"ER|PR)\b"),
        why="marker and assay names (upper-case acronyms, matched case-sensitively)"),
    Rule("clinical_staging", _ci(
        r"\bAJCC\b", r"\bUICC\b", r"\bTNM\b", r"\bFIGO\b", r"\b(?:overall|pathologic(?:al)?|clinical|tumou?r) stage\b",
        r"\bstage\s*(?:grouping\s*)?:", r"\bstage\s+(?:0|IV|I{1,3}V?|[1-4])[A-C]?\b", r"\bdistant metasta",
        r"\b(?:primary tumou?r|regional lymph nodes|distant metastasis)\s*\(p?[TNM]\)",
        r"^\s*p?[TNM]\s*(?:stage|category)?\s*:"),
        why="staging codes need clinical data (M stage) or other specimens"),
    Rule("clinical_staging", _cs(r"\b[yYrR]?[pPcC]?T(?:is|[0-4X])[a-d]?\b", r"\b[yYrR]?[pPcC]?N[0-3X][a-c]?\b",
                                 r"\b[yYrR]?[pPcC]?M[01X][a-c]?\b"),
         why="TNM codes such as pT2 pN1a pMX"),
    Rule("lymph_nodes", _ci(
        r"\blymph nodes?\b", r"\(\s*\d+\s*/\s*\d+\s*\)", r"\b\d+\s*/\s*\d+\s*(?:lymph\s*)?nodes?\b",
        r"\b(?:one|two|three|four|five|six|seven|eight|nine|ten|\d+) of (?:\w+|\d+) (?:lymph )?nodes\b",
        r"\bsentinel\b", r"\baxillary (?:contents|dissection|tail)\b", r"\bnodal\b", r"\bextranodal\b",
        r"\bisolated tumou?r cells\b", r"\b(?:micro|macro)metasta\w*"),
        why="lymph-node findings and counts come from other blocks"),
    Rule("gross_measurement", _ci(
        r"\b\d+(?:\.\d+)?\s*(?:x|×|by)\s*\d+(?:\.\d+)?(?:\s*(?:x|×|by)\s*\d+(?:\.\d+)?)?\s*(?:cm|mm)\b",
        r"\btumou?r size\b", r"\bsize of (?:the )?tumou?r\b", r"\bgreatest (?:dimension|diameter)\b",
        r"\b(?:tumou?r|carcinoma|mass|lesion|nodule|neoplasm|specimen)\b[^.]{0,40}\bmeasur(?:es|ing|ed)\s+"
        r"(?:up to\s+|approximately\s+|about\s+)?\d", r"\bweigh(?:s|ing|t)\b",
        r"\b\d+(?:\.\d+)?\s*(?:g|grams?|gm)\b", r"^\s*size\s*:"),
        why="sizes and weights of the tumour or the gross specimen"),
    Rule("gross_measurement", _ci(r"\bmeasur(?:es|ing|ed)\s+(?:up to\s+|approximately\s+|about\s+)?\d"),
         unless=_ci(r"\bmargins?\b"),
         why="other measurements; a margin distance is kept (margins are seen on the slide)"),
    Rule("gross_description", _ci(
        r"\breceived (?:fresh|in formalin|in saline|unfixed|labeled|in a container)\b", r"\blabell?ed (?:with|as)\b",
        r"\bin formalin\b", r"\bformalin[- ]fixed\b", r"\bsubmitted (?:entirely|in toto|in|for)\b",
        r"\bcassettes?\b", r"\bblocks? [A-Z]?\d", r"\brepresentative sections?\b", r"\bserially sectioned\b",
        r"\bsectioned\b", r"\bbisected\b", r"\btrisected\b", r"\bcut surface\b", r"\bgross(?:ly)?\b",
        r"\bspecimen (?:consists|is received|measures|is oriented)\b", r"\binked\s+(?:in\s+)?(?:black|blue|"
        r"green|red|yellow|orange|violet|purple)\b", r"\btan[- ](?:white|pink|yellow|brown|red)\b",
        r"\bin toto\b", r"\bmacroscopic\w*", r"\bsutures? (?:designat|mark|indicat|orient)\w*", r"\b(?:short|long) sutures?\b",
        r"\bspecimen is oriented\b", r"\bfixed\b", r"^\s*(?:tumou?r )?focality\s*:",
        r"^\s*specimen integrity\s*:"),
        why="gross description (what the prosector saw and how the specimen was cut)"),
    Rule("specimen", _ci(
        r"^\s*(?:procedure|specimen(?: type| site| laterality| integrity| received| size)?|laterality|"
        r"tumou?r site|tumou?r location|site|location|hand(?:edness)?|container|source|part\s*\d+)\s*:",
        r"^\s*specimen\b[^:]{0,30}:"),
        why="specimen, procedure, site and laterality fields (not visible on the slide)"),
    Rule("specimen", _ci(r"^(?=.{0,120}$).*\b(?:\w+ectomy|resection|excision|biops(?:y|ies)|dissection|amputation|"
                         r"curettings?|TURBT?|core|punch)\b"),
         unless=FINDING_RE,
         why="a specimen label (site and procedure with no finding); a label followed by a diagnosis "
             "keeps the diagnosis"),
    Rule("cross_reference", _ci(
        r"\bsee (?:comment|note|below|above|addendum|synoptic|separate|also|report|part)\b", r"\brefer to\b",
        r"\bpreviously reported\b", r"\bseparate report\b", r"\bcompared? (?:with|to) (?:the )?(?:prior|previous)\b",
        r"\boutside (?:consult\w*|slides|material|report|hospital)\b", r"\bslides? (?:were |are )?reviewed\b",
        r"\bconsult(?:ation)? report\b", r"\bin (?:slides?|blocks?) [A-Z]\d", r"\bparts? [A-Z](?:\s*(?:and|-)\s*[A-Z])?\b"),
        why="references to other parts, slides or reports"),
)

RULE_NAMES: tuple[str, ...] = tuple(dict.fromkeys(r.name for r in SENTENCE_RULES))
SECTION_RULE_NAMES: tuple[str, ...] = tuple(f"section:{k}" for k in dict.fromkeys(SECTION_HEADERS.values()) if k != KEEP)

# A specimen label before the diagnosis: "A. LEFT BREAST, MASTECTOMY: INVASIVE DUCTAL CARCINOMA".
LABEL_RE = re.compile(r"^\s*(?P<label>(?:(?:[A-Z]|\d{1,2})[.)]\s*)?[^:]{2,120}?)\s*:\s*(?P<rest>.*)$")
PROCEDURE_RE = _ci(r"\b(?:\w+ectomy|resection|excision|biops(?:y|ies)|core|needle|dissection|amputation|"
                   r"wide local|curettings?|transurethral|TURB?T?|lumpectomy|segmentectomy|wedge)\b")


def first_rule(sentence: str) -> str | None:
    """The name of the first sentence rule that drops `sentence`, or None to keep it."""
    for rule in SENTENCE_RULES:
        if rule.matches(sentence):
            return rule.name
    return None
