"""tcga_reports: H&E-visible filtering of pathology reports, rule by rule, and the CLI.

Every report here is invented for the tests (clearly synthetic names, numbers and dates), written in
the styles TCGA reports come in: narrative sections, CAP synoptic fields and all-caps diagnosis lists.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from data_recipes.tcga_reports import (
    PROMPTS,
    RULE_NAMES,
    SECTION_RULE_NAMES,
    ReportInputError,
    build_report_targets,
    filter_report,
    first_rule,
    main,
    report_units,
    split_sentences,
    stage1_prompt,
)
from pathchat.model.conversation import messages_from_record

BREAST = """SURGICAL PATHOLOGY REPORT
Accession No: S09-12345            Date Received: 03/14/2009
Patient: DOE, JANE   MRN: 0000000

CLINICAL HISTORY:
62 year old female with a palpable left breast mass. History of
hypertension. Mammogram showed a spiculated lesion.

SPECIMEN(S):
A. Left breast, modified radical mastectomy
B. Left axillary contents

GROSS DESCRIPTION:
A. Received in formalin labeled with the patient's name and "left breast" is a
mastectomy specimen measuring 22.0 x 18.0 x 5.0 cm. The deep margin is inked black.
Sectioning reveals a firm tan-white mass measuring 2.5 x 2.0 x 1.8 cm. Representative
sections are submitted in cassettes A1-A12.

MICROSCOPIC DESCRIPTION:
Sections show an infiltrating ductal carcinoma composed of nests and cords of
pleomorphic tumor cells with prominent nucleoli. Mitotic figures are frequent (15 per 10 HPF).
Foci of comedo-type necrosis are present. Lymphovascular invasion is identified.
No perineural invasion is seen.

FINAL DIAGNOSIS:
A. LEFT BREAST, MODIFIED RADICAL MASTECTOMY:
- INFILTRATING DUCTAL CARCINOMA, NOTTINGHAM GRADE 3 (SEE COMMENT).
- DUCTAL CARCINOMA IN SITU, SOLID TYPE WITH COMEDONECROSIS, INTERMEDIATE NUCLEAR GRADE.
- SURGICAL MARGINS FREE OF CARCINOMA; CARCINOMA IS 0.4 CM FROM THE DEEP MARGIN.
- METASTATIC CARCINOMA IN TWO OF FIFTEEN LYMPH NODES (2/15).
B. LEFT AXILLARY CONTENTS, DISSECTION:
- FIFTEEN LYMPH NODES, SEE PART A.

COMMENT:
Estrogen receptor is positive (95%) and HER2 is negative by immunohistochemistry.
Pathologic stage: pT2 pN1a pMX. Clinical correlation is recommended.

Electronically signed by John Smith, M.D. on 03/20/2009
"""

COLON_SYNOPTIC = """SIGMOID COLON, SEGMENTAL RESECTION
TUMOR SUMMARY
Procedure: Sigmoidectomy
Specimen Length: 24.5 cm
Tumor Site: Sigmoid colon
Tumor Size: Greatest dimension: 4.5 cm
Macroscopic Tumor Perforation: Not identified
Histologic Type: Adenocarcinoma
Histologic Grade: Moderately differentiated (low grade)
Microscopic Tumor Extension: Tumor invades through the muscularis propria into pericolorectal adipose tissue
Margins: Uninvolved by invasive carcinoma
Distance of invasive carcinoma from closest margin: 0.8 cm (radial margin)
Lymph-Vascular Invasion: Present (small vessel)
Perineural Invasion: Not identified
Number of Lymph Nodes Examined: 18
Number of Lymph Nodes Involved: 0
Primary Tumor (pT): pT3
Regional Lymph Nodes (pN): pN0
Distant Metastasis (pM): Not applicable
Microsatellite Instability: MSI-H by PCR
Mismatch repair proteins: Loss of nuclear expression of MLH1 and PMS2
"""

LUNG = """FINAL DIAGNOSIS:
Right upper lobe, lobectomy:
Invasive squamous cell carcinoma, moderately differentiated, with keratinization and intercellular bridges.
Tumor is negative for malignancy at the bronchial margin. Visceral pleural invasion is not identified.
Tumor cells are positive for p40 and CK5/6 and negative for TTF-1 and napsin A.
Background lung shows emphysematous changes and anthracotic pigment.

FROZEN SECTION DIAGNOSIS:
Bronchial margin, negative for carcinoma (Dr. A. Jones).

INTRAOPERATIVE CONSULTATION: Squamous cell carcinoma.
"""

NOTHING_VISIBLE = """CLINICAL HISTORY: 71 yo male, prior prostatectomy, rising PSA.
SPECIMEN: Bladder, TURBT.
GROSS DESCRIPTION: Received in formalin are multiple fragments of tan tissue measuring 2.0 x 1.5 x 0.5 cm
in aggregate, entirely submitted in cassettes A1-A3.
Immunohistochemical stains for GATA3 were performed on block A2.
See separate report for molecular results.
Dictated by: R. Roe, MD  04/02/2011
"""


def test_narrative_breast_report():
    r = filter_report(BREAST)
    assert r.text == (
        "Sections show an infiltrating ductal carcinoma composed of nests and cords of pleomorphic tumor cells "
        "with prominent nucleoli. Mitotic figures are frequent (15 per 10 HPF). Foci of comedo-type necrosis "
        "are present. Lymphovascular invasion is identified. No perineural invasion is seen.\n"
        "INFILTRATING DUCTAL CARCINOMA, NOTTINGHAM GRADE 3. DUCTAL CARCINOMA IN SITU, SOLID TYPE WITH "
        "COMEDONECROSIS, INTERMEDIATE NUCLEAR GRADE. SURGICAL MARGINS FREE OF CARCINOMA; CARCINOMA IS 0.4 CM "
        "FROM THE DEEP MARGIN.")
    assert not r.empty
    assert [d.rule for d in r.dropped] == [
        "administrative", "administrative", "section:administrative",
        *["section:clinical_history"] * 3, *["section:specimen"] * 2, *["section:gross"] * 4,
        "specimen", "cross_reference", "lymph_nodes", "specimen", "lymph_nodes",
        "ancillary_test", "section:staging", "clinical_note", "administrative"]
    dropped = dict((d.text, d.rule) for d in r.dropped)
    assert dropped["Representative sections are submitted in cassettes A1-A12."] == "section:gross"
    assert dropped["LEFT BREAST, MODIFIED RADICAL MASTECTOMY"] == "specimen"
    assert dropped["SEE COMMENT"] == "cross_reference"
    assert dropped["Electronically signed by John Smith, M.D. on 03/20/2009"] == "administrative"
    for unseen in ("62 year", "formalin", "22.0", "Estrogen", "pT2", "LYMPH NODES", "Smith", "2009", "MASTECTOMY"):
        assert unseen not in r.text


def test_synoptic_colon_report_keeps_the_visible_fields():
    r = filter_report(COLON_SYNOPTIC)
    assert r.text.split(". ") == [
        "Histologic Type: Adenocarcinoma", "Histologic Grade: Moderately differentiated (low grade)",
        "Microscopic Tumor Extension: Tumor invades through the muscularis propria into pericolorectal adipose tissue",
        "Margins: Uninvolved by invasive carcinoma",
        "Distance of invasive carcinoma from closest margin: 0.8 cm (radial margin)",
        "Lymph-Vascular Invasion: Present (small vessel)", "Perineural Invasion: Not identified."]
    assert [(d.text.split(":")[0], d.rule) for d in r.dropped] == [
        ("SIGMOID COLON, SEGMENTAL RESECTION", "specimen"), ("Procedure", "section:specimen"),
        ("Specimen Length", "specimen"), ("Tumor Site", "specimen"), ("Tumor Size", "gross_measurement"),
        ("Macroscopic Tumor Perforation", "gross_description"),
        ("Number of Lymph Nodes Examined", "lymph_nodes"), ("Number of Lymph Nodes Involved", "lymph_nodes"),
        ("Primary Tumor (pT)", "clinical_staging"), ("Regional Lymph Nodes (pN)", "clinical_staging"),
        ("Distant Metastasis (pM)", "clinical_staging"), ("Microsatellite Instability", "ancillary_test"),
        ("Mismatch repair proteins", "ancillary_test")]


def test_lung_report_drops_stains_and_the_frozen_section():
    r = filter_report(LUNG)
    assert r.text == (
        "Invasive squamous cell carcinoma, moderately differentiated, with keratinization and intercellular "
        "bridges. Tumor is negative for malignancy at the bronchial margin. Visceral pleural invasion is not "
        "identified. Background lung shows emphysematous changes and anthracotic pigment.")
    assert [(d.rule, d.text[:24]) for d in r.dropped] == [
        ("specimen", "Right upper lobe, lobect"), ("ancillary_test", "Tumor cells are positive"),
        ("section:intraoperative", "Bronchial margin, negati"), ("section:intraoperative", "Squamous cell carcinoma.")]


def test_a_report_with_nothing_visible_is_empty_and_flagged():
    r = filter_report(NOTHING_VISIBLE)
    assert r.text == "" and r.empty
    assert [d.rule for d in r.dropped] == ["section:clinical_history", "section:specimen", *["section:gross"] * 3,
                                        "section:administrative"]
    assert filter_report("").empty and filter_report("\n  \n").dropped == []


# Each sentence rule: a sentence it drops, and a near miss (same words, visible content) it keeps.
RULE_CASES = [
    ("administrative", "Electronically signed by Jane Roe, M.D.", "Tumor cells show nuclear grooves."),
    ("administrative", "Case reviewed on January 5, 2010.", "Tumour is grade 3 of 3."),
    ("administrative", "S10-004321 (block 1).", "Glands are back-to-back with cribriform architecture."),
    ("patient_history", "The patient received neoadjuvant chemotherapy.",
     "Marked stromal fibrosis and hemosiderin-laden macrophages are present."),
    ("patient_history", "Age: 54", "Apocrine metaplasia is present."),
    ("clinical_note", "Clinical correlation is recommended.", "Tumor shows a solid growth pattern."),
    ("intraoperative", "This confirms the frozen section diagnosis.", "Sections show papillary carcinoma."),
    ("ancillary_test", "ER: positive (Allred score 8).", "Margins are negative for carcinoma."),
    ("ancillary_test", "Tumor cells are positive for TTF-1.", "Negative for high-grade dysplasia."),
    ("ancillary_test", "A PAS stain highlights fungal hyphae.", "Fungal hyphae are present."),
    ("clinical_staging", "pT2 N0 M0", "Nottingham grade 2 (tubules 3, nuclei 2, mitoses 1)."),
    ("clinical_staging", "AJCC stage IIA.", "Gleason score 3+4=7 (Grade Group 2)."),
    ("lymph_nodes", "Metastatic carcinoma in 2 of 14 lymph nodes (2/14).", "Lymphovascular invasion is present."),
    ("gross_measurement", "The tumor measures 3.2 x 2.1 x 1.5 cm.", "Carcinoma is 0.2 cm from the inked deep margin."),
    ("gross_measurement", "Tumor size: 2.3 cm.", "Mitoses: 12 per 10 high-power fields."),
    ("gross_measurement", "Tumor measures 2.0 cm and is 0.1 cm from the margin.",
     "The closest (deep) margin measures 2 mm."),
    ("gross_description", "The specimen is serially sectioned and entirely submitted.",
     "Carcinoma extends to the inked margin."),
    ("specimen", "Laterality: Left.", "Solid and trabecular growth with focal necrosis."),
    ("specimen", "Right colon, hemicolectomy", "Colon, hemicolectomy, with invasive adenocarcinoma."),
    ("cross_reference", "See comment.", "Comedonecrosis is present."),
]


@pytest.mark.parametrize(("rule", "drop", "keep"), RULE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RULE_CASES)])
def test_each_rule_drops_and_keeps(rule, drop, keep):
    assert first_rule(drop) == rule
    assert first_rule(keep) is None
    assert filter_report(f"DIAGNOSIS:\n{keep}\n{drop}\n").dropped[-1].rule == rule


def test_every_rule_is_exercised():
    covered = {c[0] for c in RULE_CASES}
    assert covered == set(RULE_NAMES)
    seen = {d.rule for report in (BREAST, COLON_SYNOPTIC, LUNG, NOTHING_VISIBLE) for d in filter_report(report).dropped}
    assert set(SECTION_RULE_NAMES) - seen == {"section:ancillary"}
    r = filter_report("IMMUNOHISTOCHEMISTRY:\nThe tumour cells label diffusely.\nDIAGNOSIS:\nSeminoma.")
    assert (r.text, r.dropped[0].rule) == ("Seminoma.", "section:ancillary")


def test_sentence_splitting_and_wrapped_lines():
    assert split_sentences("Reviewed by Dr. A. Jones, M.D. today. Margins are clear. Tumor is 0.5 cm away.") == \
        ["Reviewed by Dr. A. Jones, M.D. today.", "Margins are clear.", "Tumor is 0.5 cm away."]
    assert split_sentences("A. Left breast. B. Right breast.") == ["A. Left breast.", "B. Right breast."]
    assert report_units("Sections show a\nwrapped sentence.\nHistologic type: ductal\n\nGROSS\nReceived fresh.") == \
        ["Sections show a wrapped sentence.", "Histologic type: ductal", "", "GROSS:", "Received fresh."]


def test_prompts_are_deterministic_and_varied():
    slides = [f"TCGA-XX-{i:04d}-01Z-00-DX1" for i in range(64)]
    first = [stage1_prompt(s) for s in slides]
    assert first == [stage1_prompt(s) for s in slides]
    assert len(set(first)) == len(PROMPTS) == 8
    assert sum(a != b for a, b in zip(first, [stage1_prompt(s, seed=1) for s in slides], strict=True)) > 32


def test_cli_folder_to_targets_and_conversations(tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    for slide, text in {"TCGA-S1": BREAST, "TCGA-S2": LUNG, "TCGA-S3": NOTHING_VISIBLE}.items():
        (folder / f"{slide}.txt").write_text(text)
    out, conv = tmp_path / "targets.jsonl", tmp_path / "conv.jsonl"
    assert main([str(folder), "--out", str(out), "--conversations", str(conv), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["reports"], summary["kept"], summary["empty_slides"], summary["conversations"]) == \
        (3, 2, ["TCGA-S3"], 2)
    assert summary["rule_counts"]["section:gross"] == 7 and summary["rule_counts"]["ancillary_test"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["slide"], r["empty"]) for r in rows] == [("TCGA-S1", False), ("TCGA-S2", False), ("TCGA-S3", True)]
    assert rows[1]["report"] == filter_report(LUNG).text
    assert rows[1]["dropped"][0] == ["Right upper lobe, lobectomy", "specimen"]
    records = [json.loads(line) for line in conv.read_text().splitlines()]
    assert [r["slide"] for r in records] == ["TCGA-S1", "TCGA-S2"]
    for rec, row in zip(records, rows, strict=False):
        slide, messages = messages_from_record(rec)
        assert slide == row["slide"] and messages[1]["content"] == row["report"]
        assert messages[0]["content"] == f"<slide>\n{stage1_prompt(slide)}"


def test_csv_and_jsonl_inputs(tmp_path):
    csv = tmp_path / "reports.csv"
    pd.DataFrame({"patient_filename": ["P1", "P2"], "text": [LUNG, COLON_SYNOPTIC]}).to_csv(csv, index=False)
    result = build_report_targets(csv, tmp_path / "a.jsonl", slide_key="patient_filename", report_key="text",
                                  progress=False)
    assert (result.reports, result.kept, result.empty) == (2, 2, [])
    with pytest.raises(ReportInputError, match="no column 'slide'"):
        build_report_targets(csv, tmp_path / "b.jsonl", progress=False)
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps({"slide": "s", "report": LUNG}) + "\n" + json.dumps({"slide": "s", "report": "x"}))
    with pytest.raises(ReportInputError, match="slide 's' is named twice"):
        build_report_targets(jsonl, tmp_path / "c.jsonl", progress=False)
    assert main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "d.jsonl")]) == 1
