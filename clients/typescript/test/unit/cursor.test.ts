import { describe, expect, it } from "vitest";
import { reaches } from "../../src/cursor.js";

// Marks are `<xmin>_<xmax>_<xip>_<maxId>_<nextXid>` (cursor/src/lib.rs).
const at = (mark: string, generation = "ab") => `1.${generation}.${mark}`;
const within = (from: string, to: string) => `1.ab.${from}.${to}.55.12.55`;

describe("reaches", () => {
  it("is true for the same cursor and for later ones", () => {
    expect(reaches(at("10_20__50_20"), at("10_20__50_20"))).toBe(true);
    expect(reaches(at("12_30__80_30"), at("10_20__50_20"))).toBe(true);
  });

  it("is false for an earlier cursor", () => {
    expect(reaches(at("10_20__50_20"), at("12_30__80_30"))).toBe(false);
  });

  it("needs the transactions the target saw, and its changes", () => {
    // The target saw 12 committed; the position still has it running.
    expect(reaches(at("12_30_12_80_30"), at("13_25__60_25"))).toBe(false);
    // Same snapshot, fewer changes.
    expect(reaches(at("10_20__40_20"), at("10_20__50_20"))).toBe(false);
    // A transaction running in both is fine.
    expect(reaches(at("12_30_12_80_30"), at("12_25_12_60_25"))).toBe(true);
  });

  it("counts a position inside a batch only from its start", () => {
    expect(reaches(within("12_30__80_30", "14_40__90_40"), at("12_30__80_30"))).toBe(true);
    expect(reaches(within("10_20__50_20", "14_40__90_40"), at("12_30__80_30"))).toBe(false);
  });

  it("reads runs of in-progress xids (a standby's marks)", () => {
    // 12 to 14 running in both, written as a run or one by one.
    expect(reaches(at("12_30_12~14_80_30"), at("12_25_12-13-14_60_25"))).toBe(true);
    // The position still has 15 running, which the target saw committed.
    expect(reaches(at("12_30_12~15_80_30"), at("12_25_12~14_60_25"))).toBe(false);
    expect(reaches(at("12_30_12~15_80_30"), at("12_25_12-13-15-16_60_25"))).toBe(false);
    expect(reaches(at("12_30_12~15_80_30"), at("12_25_12~16_60_25"))).toBe(true);
  });

  it("is false across logs and for what it cannot read", () => {
    expect(reaches(at("12_30__80_30", "cd"), at("10_20__50_20"))).toBe(false);
    for (const bad of ["", "x", "2.ab.1_1__0_1", "1.ab.1_1_0", "1.ab.x_1__0_1", "1.ab.1_1__0_1.2_2__0_2"]) {
      expect(reaches(bad, at("10_20__50_20"))).toBe(false);
      expect(reaches(at("10_20__50_20"), bad)).toBe(false);
    }
  });
});
